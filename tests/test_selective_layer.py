"""Selective layer fine-tuning: client selection and freezing, policies, per-layer aggregation.

Client tests use the real MiniLM model, the real ClientPart, the real trainer and the
real codec (no Flower); one small real simulation checks the pieces together.
"""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from pollinate import data as datalib
from pollinate.aggregators import ClientUpdate, resolve
from pollinate.aggregators.selective_layer import (
    HEATMAP,
    POLICIES,
    SelectionInput,
    SelectiveLayer,
    SelectiveLayerClient,
    block_of,
    layer_importance,
    objective,
    regulate,
    transformer_layers,
)
from pollinate.client.trainer import train
from pollinate.codec import Delta, DeltaHeader, decode, encode
from pollinate.config import ConfigError, RunConfig
from pollinate.deltas import add
from pollinate.modeling import ModelSpec, build_model
from pollinate.protocol import uplink_codec

CONFIG = RunConfig(num_clients=2, max_train_examples=96, local_steps=3, batch_size=16)


@pytest.fixture(scope="module")
def built():
    """One MiniLM model for the module, with its version-0 adapter."""
    model = build_model(ModelSpec(num_labels=4, rank=4))
    return model, model.adapter_state()


@pytest.fixture
def model(built):
    """The module's model reset to version 0 with every adapter tensor trainable."""
    model, initial = built
    model.load_adapter_state(initial)
    model.set_trainable(model.adapter_names)
    return model


@pytest.fixture(scope="module")
def local(built):
    table = datalib.client_table(CONFIG, datalib.train_table(CONFIG), 0, CONFIG.num_clients)
    return datalib.encode(table, built[0].tokenizer, "classification", 64)


def probe_of(model, data, count=2):
    it = datalib.batches(data, CONFIG.batch_size, model.tokenizer.pad_token_id, shuffle=True, seed=1)
    return [b for _, b in zip(range(count), it, strict=False)]


def blocks_in(names) -> set[int]:
    return {b for b in map(block_of, names) if b is not None}


# -- client ----------------------------------------------------------------------------

def test_two_layer_client_trains_and_sends_exactly_two_layers(model, local):
    part = SelectiveLayerClient({"policy": "gradient"}, {}, {"max-layers": 2})
    part.prepare(model, local, probe_of(model, local))
    start = model.adapter_state()
    train(model, local, CONFIG, seed=3)
    after = model.adapter_state()
    update = part.update(model, start)
    payload = encode(Delta(DeltaHeader(), update), uplink_codec(CONFIG))
    sent = decode(payload, SelectiveLayer().uplink_spec(model)).tensors

    report = part.report()
    chosen = {int(b) for b in str(report["layers"]).split(",")}
    layers = transformer_layers(model)
    assert len(chosen) == 2 and report["max-layers"] == 2 and report["selection"] == "gradient"
    assert blocks_in(sent) == chosen
    assert set(sent) == {n for b in chosen for n in layers[b]} | set(model.head_names())
    for name in model.adapter_names:
        if block_of(name) in chosen or name in model.head_names():
            assert not torch.equal(after[name], start[name]), f"{name} did not train"
        else:
            assert torch.equal(after[name], start[name]), f"frozen {name} changed"


def test_gradient_policy_picks_the_layers_with_the_largest_gradients(model, local):
    """LoRA B starts at zero, so B's gradient scales with A: blow up A in blocks 1 and 3."""
    layers = transformer_layers(model)
    with torch.no_grad():
        for block in (1, 3):
            for name in layers[block]:
                if "lora_A" in name:
                    model.parameter(name).mul_(1000.0)
    probe = probe_of(model, local)
    scores = layer_importance(model, layers, probe)
    assert min(scores[1], scores[3]) > 100 * max(scores[b] for b in (0, 2, 4, 5))
    assert all(model.parameter(n).grad is None for n in model.adapter_names)
    part = SelectiveLayerClient({"policy": "gradient"}, {}, {"max-layers": 2})
    part.prepare(model, local, probe)
    assert part.report()["layers"] == "1,3"
    trainable = {n for n in model.adapter_names if model.parameter(n).requires_grad}
    assert blocks_in(trainable) == {1, 3} and set(model.head_names()) <= trainable


def test_named_policies():
    blocks = tuple(range(6))
    scores = {b: float(s) for b, s in zip(blocks, [5, 1, 4, 0, 3, 2], strict=True)}
    pick = {name: POLICIES[name].choose(SelectionInput(blocks, 2, scores, seed=7))[0] for name in POLICIES}
    assert pick["all"] == list(blocks)
    assert pick["top"] == [4, 5] and pick["bottom"] == [0, 1]
    assert pick["gradient"] == [0, 2] and pick["regulated"] == [0, 2]  # no assignment: gradient
    draws = {tuple(POLICIES["random"].choose(SelectionInput(blocks, 2, seed=s))[0]) for s in range(20)}
    assert len(draws) > 5 and all(len(d) == 2 for d in draws)
    assert POLICIES["random"].choose(SelectionInput(blocks, 2, seed=7))[0] == pick["random"]
    assert POLICIES["regulated"].choose(SelectionInput(blocks, 2, scores, assigned=(3, 5))) == (
        [3, 5], "regulated")
    # an assignment that exceeds this node's budget is not followed
    assert POLICIES["regulated"].choose(SelectionInput(blocks, 2, scores, assigned=(1, 3, 5))) == (
        [0, 2], "gradient")


def random_case(seed: int):
    rng = random.Random(seed)
    nodes, num_blocks = rng.randint(2, 4), rng.randint(3, 5)
    scores = {n: {b: rng.random() ** 3 for b in range(num_blocks)} for n in range(nodes)}
    budgets = {n: rng.randint(1, num_blocks) for n in range(nodes)}
    return scores, budgets, num_blocks


def best_by_enumeration(scores, budgets, num_blocks, lam) -> float:
    options = [itertools.combinations(range(num_blocks), budgets[n]) for n in sorted(scores)]
    return max(objective(dict(zip(sorted(scores), combo, strict=True)), scores, lam)
               for combo in itertools.product(*options))


@pytest.mark.parametrize("lam", [0.0, 0.2, 1.0, 3.0])
def test_regulated_selection_is_optimal_on_small_cases(lam):
    for seed in range(25):
        scores, budgets, num_blocks = random_case(seed)
        best = best_by_enumeration(scores, budgets, num_blocks, lam)
        chosen = regulate(scores, budgets, lam)
        assert all(len(chosen[n]) == budgets[n] for n in scores)
        assert objective(chosen, scores, lam) == pytest.approx(best, abs=1e-9)
        searched = regulate(scores, budgets, lam, exact_limit=0)  # the local-search fallback
        assert objective(searched, scores, lam) <= best + 1e-9
        assert all(len(searched[n]) == budgets[n] for n in scores)


def test_regulation_trades_importance_for_agreement():
    rng = random.Random(0)
    scores = {n: {b: rng.random() for b in range(6)} for n in range(6)}
    budgets = {n: 2 for n in scores}
    own = regulate(scores, budgets, 0.0)
    assert own == {n: sorted(sorted(s, key=lambda b: -s[b])[:2]) for n, s in scores.items()}
    assert len({tuple(v) for v in own.values()}) > 1
    agreed = regulate(scores, budgets, 10.0)
    assert len({tuple(v) for v in agreed.values()}) == 1


# -- server ----------------------------------------------------------------------------

def client_delta(model, blocks, value: float):
    """A delta touching ``blocks`` and the head, sent through the compressed uplink codec."""
    gen = torch.Generator().manual_seed(int(value * 100))
    layers = transformer_layers(model)
    names = [n for b in blocks for n in layers[b]] + model.head_names()
    delta = {n: value * torch.randn(model.parameter(n).shape, generator=gen) for n in names}
    payload = encode(Delta(DeltaHeader(), delta), uplink_codec(CONFIG))
    return decode(payload, SelectiveLayer().uplink_spec(model)).tensors


def test_server_averages_each_layer_over_the_clients_that_updated_it(model):
    agg = SelectiveLayer(policy="regulated")
    state = agg.initial_state(model)
    agg.begin(1, state)
    one, two = client_delta(model, [0, 1], 0.5), client_delta(model, [1, 2], 0.25)
    scores = ",".join(str(v) for v in (1, 2, 3, 4, 5, 6))
    for node, delta, n in ((11, one, 10), (22, two, 30)):
        update = ClientUpdate(node, delta, n, 4, 8.0,
                              capabilities={"max-layers": 2, "importance": scores})
        agg.check(update)
        agg.accumulate(update)
    new = add(state, agg.finalize())
    layers = transformer_layers(model)
    for name in (n for b in (3, 4, 5) for n in layers[b]):
        assert torch.equal(new[name], state[name])  # nobody updated blocks 3-5
    for name in layers[0]:
        torch.testing.assert_close(new[name], state[name] + one[name])
    for name in layers[2]:
        torch.testing.assert_close(new[name], state[name] + two[name])
    for name in layers[1] + model.head_names():
        torch.testing.assert_close(new[name], state[name] + (10 * one[name] + 30 * two[name]) / 40)
    metrics = agg.metrics()
    assert [metrics[f"selected_layer_{b}"] for b in range(6)] == [1, 2, 1, 0, 0, 0]
    assert metrics["layers_per_client"] == 2
    # regulated: the next round assigns both reporting nodes their budget of blocks
    orders = agg.instructions(2, [11, 22, 33])
    assert orders[11]["layers"] == orders[22]["layers"] == "4,5" and "layers" not in orders[33]


def test_server_rejects_a_report_for_another_model(model):
    agg = SelectiveLayer()
    agg.begin(1, agg.initial_state(model))
    update = ClientUpdate(1, client_delta(model, [0], 0.5), 10, 4, 8.0,
                          capabilities={"max-layers": 2, "importance": "1,2,3"})
    with pytest.raises(ValueError, match="importance needs 6"):
        agg.check(update)


# -- configuration errors --------------------------------------------------------------

def options_of(text: str) -> dict:
    return RunConfig(aggregator="selective-layer", aggregator_options=text).aggregator_option_map


@pytest.mark.parametrize("text, node, match", [
    ("policy=gradient", {"max-layers": 0}, "max-layers.*at least 1"),
    ("policy=gradient", {"max-layers": 7}, "max-layers=7 .*only 6"),
    ("budgets=2:0", {"partition-id": 1}, "budgets.*at least 1"),
    ("budgets=2:9", {"partition-id": 1}, "budgets.*max-layers=9"),
    ("budgets=2:6", {}, "budgets has 2 entries.*partition-id"),
    ("policy=all", {"max-layers": 2}, "policy 'all' trains all 6"),
])
def test_invalid_budgets_fail_with_a_clear_message(model, local, text, node, match):
    with pytest.raises(ConfigError, match=match):
        SelectiveLayerClient(options_of(text), {}, node).prepare(model, local, [])


@pytest.mark.parametrize("text, match", [
    ("policy=best", "policy: unknown selection policy 'best'"),
    ("budgets=two", "budgets: expected a number of layers"),
    ("lambda=-1", "lambda must be >= 0"),
    ("budget=2", "unknown option.*'budget'"),
])
def test_invalid_options_fail_on_the_server(text, match):
    with pytest.raises(ConfigError, match=match):
        resolve("selective-layer")(**options_of(text))


def test_budgets_are_checked_against_the_model_before_any_round(model):
    with pytest.raises(ConfigError, match="budgets: max-layers=8 but the model has only 6"):
        SelectiveLayer(**options_of("budgets=2:8")).initial_state(model)


def test_lora_on_embeddings_is_refused():
    embedded = build_model(ModelSpec(num_labels=2, rank=2, target_modules=("query", "word_embeddings")))
    with pytest.raises(ConfigError, match="word_embeddings.*embeddings"):
        SelectiveLayer().initial_state(embedded)


# -- a real federation -----------------------------------------------------------------

@pytest.mark.slow
def test_simulation_with_mixed_budgets(tmp_path):
    from pollinate.server.rundir import RunDirectory
    from pollinate.simulations.launch import simulate

    config = RunConfig(num_clients=3, num_server_rounds=2, max_train_examples=64, test_examples=64,
                       aggregator="selective-layer", aggregator_options="policy=regulated,budgets=2:6",
                       out=str(tmp_path), resume=False)
    summary = simulate(config)
    rounds = RunDirectory(config.out).read_metrics()
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for record in rounds[1:]:
        clients = record["client_metrics"]
        assert sorted(c["max-layers"] for c in clients) == [2, 2, 6]
        for c in clients:
            assert len(c["layers"].split(",")) == c["max-layers"]
        counts = [record["aggregator"][f"selected_layer_{b}"] for b in range(6)]
        assert sum(counts) == 10 and record["aggregator"]["layers_per_client"] == pytest.approx(10 / 3)
        small = [c["bytes_up"] for c in clients if c["max-layers"] == 2]
        big = [c["bytes_up"] for c in clients if c["max-layers"] == 6]
        assert max(small) < min(big)
    first, second = rounds[1]["client_metrics"], rounds[2]["client_metrics"]
    assert {c["selection"] for c in first} == {"gradient"}  # round 1: no scores yet
    assert {c["selection"] for c in second} == {"regulated"}
    expected = regulate(
        {c["node"]: dict(enumerate(float(v) for v in c["importance"].split(","))) for c in first},
        {c["node"]: c["max-layers"] for c in first}, 0.1)
    assert {c["node"]: [int(b) for b in c["layers"].split(",")] for c in second} == expected
    assert HEATMAP in summary["plots"]
    assert (tmp_path / HEATMAP).stat().st_size > 1000
    assert json.loads((tmp_path / "summary.json").read_text())["final"]["clients"] == 3
