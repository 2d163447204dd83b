"""Every built-in LoRA aggregator end to end in a real simulation, with mixed ranks where it can.

3 clients, 2 rounds, 100 examples each on the generated 4-class task (chance 0.25). All
run with a dense codec both ways, so the test is about the aggregation: FLoRA and FlexLoRA
need one (docs/aggregators.md, "Codecs for methods that send whole factors"), and with
two rounds top-k is too slow to tell FFA from chance.
"""

from __future__ import annotations

import pytest
import torch

from pollinate.aggregators import ClientUpdate
from pollinate.aggregators.hetlora import HetLoRA
from pollinate.config import ConfigError, RunConfig
from pollinate.server.rundir import RunDirectory
from pollinate.simulations.launch import simulate

DENSE = {"codec": "int8-row", "downlink_codec": "int8-row"}
CASES = [("ffa", ""), ("flora", "8,4,2"), ("hetlora", "8,4,2"), ("flexlora", "8,4,2")]


@pytest.mark.slow
@pytest.mark.parametrize(("aggregator", "profile"), CASES, ids=[c[0] for c in CASES])
def test_builtin_aggregator_learns_with_its_ranks(tmp_path, aggregator, profile):
    config = RunConfig(aggregator=aggregator, rank_profile=profile, num_clients=3, num_server_rounds=2,
                       max_train_examples=100, test_examples=100, learning_rate=5e-3,
                       out=str(tmp_path), resume=False, **DENSE)
    summary = simulate(config, num_cpus=2)
    accuracy = [r["accuracy"] for r in summary["rounds"]]
    assert len(accuracy) == 3
    assert accuracy[2] >= 0.45 and accuracy[2] > accuracy[0] + 0.1  # chance 0.25, majority 0.30

    rounds = RunDirectory(config.out).read_metrics()[1:]
    ranks = sorted(int(r) for r in profile.split(",")) if profile else [config.lora_rank] * 3
    for record in rounds:  # nodes below the global rank rebuild version 1 at that rank: all train in round 1
        assert not record["dropped"] and record["clients"] == 3
        assert sorted(int(c["rank"]) for c in record["client_metrics"]) == ranks
        assert record["bytes_up"] > 0 and record["bytes_down"] > 0
    if aggregator == "flora":
        assert [r["aggregator"]["stacked_rank"] for r in rounds] == [sum(ranks)] * len(rounds)


def test_hetlora_example_weighting_is_zero_padded_fedavg():
    """``weighting=examples``: the FLoRA paper's FedIT baseline for mixed ranks."""
    g = torch.Generator().manual_seed(0)
    state = {"q.lora_A.weight": torch.randn(4, 6, generator=g),
             "q.lora_B.weight": torch.randn(5, 4, generator=g)}
    changes = [(4, 10, torch.randn(4, 6, generator=g), torch.randn(5, 4, generator=g)),
               (2, 30, torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g))]
    agg = HetLoRA(weighting="examples")
    agg.begin(1, state)
    for node, (rank, n, d_a, d_b) in enumerate(changes):
        update = ClientUpdate(node, {"q.lora_A.weight": d_a, "q.lora_B.weight": d_b}, n, rank, alpha=8.0)
        agg.check(update)
        agg.accumulate(update)
    delta = agg.finalize()
    # no global_scaling known (no model seen): B changes are averaged as sent
    pad_a = [torch.cat([d_a, torch.zeros(4 - rank, 6)]) for rank, _, d_a, _ in changes]
    pad_b = [torch.cat([d_b, torch.zeros(5, 4 - rank)], 1) for rank, _, _, d_b in changes]
    assert torch.allclose(delta["q.lora_A.weight"], (10 * pad_a[0] + 30 * pad_a[1]) / 40, atol=1e-6)
    assert torch.allclose(delta["q.lora_B.weight"], (10 * pad_b[0] + 30 * pad_b[1]) / 40, atol=1e-6)

    norm = HetLoRA()
    norm.begin(1, state)
    for node, (rank, n, d_a, d_b) in enumerate(changes):
        norm.accumulate(ClientUpdate(node, {"q.lora_A.weight": d_a, "q.lora_B.weight": d_b}, n, rank, 8.0))
    assert not torch.allclose(norm.finalize()["q.lora_A.weight"], delta["q.lora_A.weight"])

    with pytest.raises(ConfigError, match="weighting must be one of"):
        HetLoRA(weighting="uniform")
