"""Expert routing: options, exact LoRA experts, deterministic routing, partial uplinks, specialisation.

Rounds run the real halves of the method the way the Flower apps do (client: load the
global state, prepare, train, encode the update; server: decode, check, accumulate,
finalize, encode and decode the increment), without Flower in between; one real
simulation covers the apps, the plots and the ``personalize`` command.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from typer.testing import CliRunner

from pollinate import data as datalib
from pollinate.aggregators import AggregationError, ClientUpdate, resolve
from pollinate.aggregators.expert_routing import (
    ExpertClient,
    ExpertRouting,
    RoutingPolicy,
    client_choice,
    expert_of,
    personalize,
    single_expert_state,
)
from pollinate.cli import app as cli_app
from pollinate.client.trainer import train
from pollinate.codec import Delta, DeltaHeader, decode, encode
from pollinate.config import ConfigError, RunConfig
from pollinate.deltas import add
from pollinate.modeling import ModelSpec, build_model
from pollinate.protocol import downlink_codec, uplink_codec
from pollinate.simulations.launch import simulate

SPEC = ModelSpec(num_labels=4, rank=4, alpha=8.0)
POPULATIONS = {"A": {0, 1}, "B": {2, 3}}


def run_config(options: str) -> RunConfig:
    return RunConfig(aggregator="expert-routing", aggregator_options=options, batch_size=16,
                     learning_rate=5e-3, max_length=32, lora_rank=SPEC.rank, lora_alpha=SPEC.alpha)


@pytest.fixture(scope="module")
def model():
    return ExpertRouting.build_model(SPEC, "cpu")


@pytest.fixture(scope="module")
def populations(model):
    """Two clients' data (and fresh examples of each) drawn from disjoint generated classes."""
    table = datalib.generated_classification(800, seed=3)
    out = {}
    for name, labels in POPULATIONS.items():
        part = table.filter(lambda r, labels=labels: r["label"] in labels)
        out[name] = tuple(datalib.encode(part.select(range(a, b)), model.tokenizer, "classification", 32)
                          for a, b in ((0, 48), (48, 168)))
    return out


@dataclass
class Round:
    state: dict[str, torch.Tensor]
    parts: dict[int, ExpertClient]
    uplinks: dict[int, Delta]
    delta: dict[str, torch.Tensor]


def federated_round(model, aggregator: ExpertRouting, config: RunConfig, state, clients, rnd: int) -> Round:
    """One round of the real client and server halves, with the codecs in between."""
    options = config.aggregator_option_map
    instructions = aggregator.instructions(rnd, sorted(clients))
    aggregator.begin(rnd, state)
    parts, uplinks = {}, {}
    for node, data in clients.items():
        part = ExpertClient(options, instructions[node], {"partition-id": node})
        part.load_global(model, state)
        part.prepare(model, data, [])
        start = model.adapter_state()
        torch.manual_seed(rnd * 100 + node)  # as the client app does: dropout draws are reproducible
        train(model, data, config, seed=rnd * 100 + node)
        payload = encode(Delta(DeltaHeader(round=rnd), part.update(model, start)), uplink_codec(config))
        uplinks[node] = decode(payload, aggregator.uplink_spec(model))
        update = ClientUpdate(node, uplinks[node].tensors, len(data), SPEC.rank, SPEC.alpha, {},
                              part.report())
        aggregator.check(update)
        aggregator.accumulate(update)
        parts[node] = part
    delta = aggregator.finalize()
    increment = encode(Delta(DeltaHeader(round=rnd), delta), downlink_codec(config))
    sent = decode(increment, aggregator.downlink_spec(model)).tensors
    return Round(add(state, sent), parts, uplinks, sent)


@pytest.mark.parametrize("options, message", [
    ("experts=0", "experts must be >= 1"),
    ("experts=4,top-k=5,client-experts=4", "top-k (5) must be <= experts (4)"),
    ("experts=4,client-experts=5", "client-experts (5) must be <= experts (4)"),
    ("experts=4,client-experts=1,top-k=2", "top-k (2) must be <= client-experts (1)"),
    ("expert=4", "unknown option 'expert'"),
    ("experts=two", "experts must be of type int"),
    ("start=kmeans", "needs kmeans-data"),
    ("choice=mine", "choice must be one of"),
    ("expert-heads=maybe", "expert-heads must be true or false"),
    ("anchors=0:1:2,experts=2,client-experts=1,top-k=1", "3 anchors for 2 experts"),
])
def test_bad_options_fail_with_a_clear_message(options, message):
    config = run_config(options)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(config.aggregator)(**config.aggregator_option_map)


def test_one_expert_alone_is_exactly_a_peft_lora_model(model):
    """Top-1 routing to expert e computes what a standard peft LoRA with e's factors computes."""
    aggregator = ExpertRouting(**run_config("experts=3,client-experts=1,top-k=1").aggregator_option_map)
    state = aggregator.initial_state(model)
    generator = torch.Generator().manual_seed(0)
    state = {n: torch.randn(t.shape, generator=generator) * 0.05 if ".lora_B" in n or ".delta_" in n else t
             for n, t in state.items()}
    assert any(".classifier.delta_weight" in n for n in state)  # each expert has its own head correction
    ExpertClient(aggregator.options, {}).load_global(model, state)
    plain = build_model(SPEC)
    batch = model.tokenizer(["market stock profit", "goal match team", "vote border army"],
                            return_tensors="pt", padding=True)
    model.model.eval()
    plain.model.eval()
    with torch.no_grad():
        for e in range(3):
            plain.load_adapter_state(single_expert_state(state, e, model.head_names()))
            model.set_policy(RoutingPolicy(allowed=(e,), top_k=1))
            torch.testing.assert_close(model.model(**batch).logits, plain.model(**batch).logits,
                                       rtol=0, atol=1e-6)
    model.set_policy(RoutingPolicy())


def test_routing_is_deterministic_and_a_client_sends_only_the_experts_it_trained(model, populations):
    config = run_config("experts=4,client-experts=2,top-k=2")
    aggregator = ExpertRouting(**config.aggregator_option_map)
    state = aggregator.initial_state(model)
    data = populations["A"][0]
    ExpertClient(aggregator.options, {}).load_global(model, state)
    first = model.gate_probs(data)
    batch = next(datalib.batches(data, 16, model.tokenizer.pad_token_id, shuffle=False))
    routed = model.model(**batch).experts
    model.load_adapter_state({n: t + 1.0 for n, t in state.items() if n.startswith("gate.")})
    assert not torch.equal(model.gate_probs(data), first)
    ExpertClient(aggregator.options, {}).load_global(model, state)
    assert torch.equal(model.gate_probs(data), first)
    assert torch.equal(model.model(**batch).experts, routed)

    result = federated_round(model, aggregator, config, state, {0: data}, rnd=1)
    chosen = result.parts[0].chosen
    assert len(chosen) == 2
    sent = {expert_of(n) for n in result.uplinks[0].tensors} - {None}
    assert sent == set(chosen)
    assert {n for n in result.uplinks[0].tensors if expert_of(n) is None} == \
        set(model.gate_names()) | set(model.head_names())
    # experts nobody trained are absent from the increment and bitwise unchanged on the server
    untouched = model.expert_names(set(range(4)) - set(chosen))
    assert not set(untouched) & set(result.delta)
    assert all(torch.equal(result.state[n], state[n]) for n in untouched)
    assert any(not torch.equal(result.state[n], state[n]) for n in model.expert_names(chosen))


def test_a_client_chooses_the_experts_that_cover_its_examples_not_the_top_means():
    # half the examples like expert 0 a lot, the other half expert 2 a bit more than expert 1;
    # expert 1 has the second highest mean, but {0, 2} gives every example its favourite
    probs = torch.tensor([[0.7, 0.3, 0.0, 0.0]] * 5 + [[0.0, 0.45, 0.55, 0.0]] * 5)
    assert probs.mean(0).topk(2).indices.sort().values.tolist() == [0, 1]
    assert client_choice(probs, 2) == (0, 2)
    assert client_choice(probs, 1) == (1,)  # one expert: the best mean is the best cover
    with pytest.raises(ValueError, match="experts to choose must be in 1..4"):
        client_choice(probs, 5)


def test_many_experts_are_chosen_by_coverage_greedily_then_by_swaps():
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(200, 40, generator=generator) * 0.01  # C(40, 4) subsets: too many to try
    favourites = (3, 10, 17, 24)
    for group, expert in enumerate(favourites):
        probs[group * 50:(group + 1) * 50, expert] += 1.0
    probs[:, 39] += 0.3  # liked a little by everyone: the best mean after the favourites' 0.25
    assert client_choice(probs / probs.sum(1, keepdim=True), 4) == favourites


def test_updates_that_break_the_expert_contract_are_rejected():
    aggregator = ExpertRouting(experts=4, **{"client-experts": 1, "top-k": 1})
    state = {"experts.0.x.lora_A.weight": torch.zeros(2, 3), "experts.1.x.lora_A.weight": torch.zeros(2, 3),
             "gate.out.bias": torch.zeros(4)}
    aggregator.begin(1, state)
    two = {n: torch.ones(2, 3) for n in list(state)[:2]}
    report = {"experts": "0", "routed-0": 5}
    with pytest.raises(AggregationError, match=r"sent experts \[0, 1\] but reported training \[0\]"):
        aggregator.check(ClientUpdate(1, two, 5, 2, 4.0, {}, report))
    with pytest.raises(AggregationError, match="trained 2 experts, client-experts is 1"):
        aggregator.check(ClientUpdate(1, two, 5, 2, 4.0, {}, {**report, "experts": "0,1", "routed-1": 1}))
    with pytest.raises(AggregationError, match="routed-0 must be an integer in 0..5"):
        aggregator.check(ClientUpdate(1, {}, 5, 2, 4.0, {}, {**report, "routed-0": 9}))


def test_separable_populations_end_up_routed_to_different_experts(model, populations):
    """Label-free start: after a few rounds the global gate sends each population to its own expert."""
    config = run_config("experts=2,client-experts=1,top-k=1")
    aggregator = ExpertRouting(**config.aggregator_option_map)
    state = aggregator.initial_state(model)
    clients = {0: populations["A"][0], 1: populations["B"][0]}

    def own_share(state, chosen) -> float:
        """Mean over populations of the share of fresh examples the gate sends to that client's expert."""
        ExpertClient(aggregator.options, {}).load_global(model, state)
        shares = [(model.gate_probs(populations[name][1]).argmax(-1) == chosen[node][0]).float().mean()
                  for node, name in enumerate(POPULATIONS)]
        return float(sum(shares)) / len(shares)

    for rnd in range(1, 5):
        result = federated_round(model, aggregator, config, state, clients, rnd)
        if rnd == 1:
            first_choice = {node: part.chosen for node, part in result.parts.items()}
            before = own_share(state, first_choice)
        state = result.state
    chosen = {node: part.chosen for node, part in result.parts.items()}
    assert chosen[0] != chosen[1]
    after = own_share(state, chosen)
    assert after >= 0.8 and after > before + 0.1, (before, after)
    for node, name in enumerate(POPULATIONS):
        assert personalize(model, state, populations[name][1]).experts == chosen[node]


@pytest.mark.slow
def test_simulation_reports_expert_usage_and_personalize_serves_a_new_client(tmp_path):
    config = RunConfig(num_clients=2, num_server_rounds=1, max_train_examples=32, test_examples=32,
                       partition="classes", batch_size=16, lora_rank=4, out=str(tmp_path / "run"),
                       resume=False, aggregator="expert-routing",
                       aggregator_options="experts=3,client-experts=1,top-k=1")
    summary = simulate(config, num_cpus=2)
    assert summary["rounds"][1]["clients"] == 2  # both rebuilt the seeded first version and trained
    assert "experts.png" in summary["plots"]
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert sum(record["aggregator"][f"expert-{e}-clients"] for e in range(3)) == 2
    assert all(len(c["experts"].split(",")) == 1 for c in record["client_metrics"])
    assert (tmp_path / "run" / "adapter" / "expert-2" / "adapter_config.json").exists()
    newcomer = tmp_path / "new.csv"
    datalib.generated_classification(40, seed=5).to_csv(str(newcomer))
    saved = tmp_path / "personal"
    result = CliRunner().invoke(cli_app, ["personalize", "--run", config.out, "--data", str(newcomer),
                                          "--save", str(saved)])
    assert result.exit_code == 0, result.output
    assert "top-1 downloaded expert" in result.output and "40 examples" in result.output
    chosen = json.loads((saved / "routing.json").read_text())["experts"]
    assert len(chosen) == 1  # client-experts=1: the one expert the gate chose, as a peft adapter
    assert sorted(p.name for p in saved.glob("expert-*")) == [f"expert-{chosen[0]}"]
    assert (saved / f"expert-{chosen[0]}" / "adapter_model.safetensors").exists()
    bad = CliRunner().invoke(cli_app, ["personalize", "--run", str(tmp_path / "nothing"), "--data",
                                       str(newcomer)])
    assert bad.exit_code == 2 and "holds no finished round" in bad.output
