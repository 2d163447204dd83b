"""Server optimizers, client optimizer state and the learning-rate schedule (issue 24).

The math is checked against hand computations and against Flower's own strategies on the
same numbers; the checkpoint, the refused pairs and the client side through real runs.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp import ServerApp
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi
from killed_server import KilledGrid, ServerKilled
from safetensors.torch import load

from pollinate import data as datalib
from pollinate.aggregators import resolve
from pollinate.client.privacy import ClientPrivacy
from pollinate.client.state import NodeMemory
from pollinate.client.trainer import (
    COSINE_FLOOR,
    load_optimizer_state,
    make_optimizer,
    optimizer_state,
    optimizer_steps,
    restricted_softmax,
    round_learning_rate,
    train,
)
from pollinate.config import SERVER_OPTIMIZERS, ConfigError, RunConfig
from pollinate.modeling import ModelSpec, build_model
from pollinate.server.optimizers import OPTIMIZERS, Adam, AvgM, ServerOptimizer, server_optimizer
from pollinate.server.rundir import Checkpoint, RunDirectory
from pollinate.simulations.launch import simulate

NAMES = ("lora_A", "lora_B")


def deltas(rounds: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Seeded global deltas of the size of a LoRA round's mean change (~1e-2 per coordinate)."""
    gen = torch.Generator().manual_seed(seed)
    return [{n: 0.01 * torch.randn(3, 4, generator=gen) for n in NAMES} for _ in range(rounds)]


def test_config_and_optimizers_name_the_same_choices():
    assert tuple(OPTIMIZERS) == SERVER_OPTIMIZERS


def test_none_is_the_delta_and_avgm_without_momentum_at_rate_one_equals_it():
    none, avgm = ServerOptimizer(), AvgM(learning_rate=1.0, momentum=0.0)
    for d in deltas(3):
        assert none.step(d) is d
        out = avgm.step(d)
        assert all(torch.equal(out[n], d[n]) for n in NAMES)
    assert none.state_dict() == {}


def test_avgm_accumulates_momentum_as_flowers_fedavgm():
    """``m = b m + d``, apply ``lr m``: after two rounds ``lr (b d1 + d2)``."""
    d1, d2 = deltas(2)
    avgm = AvgM(learning_rate=0.5, momentum=0.9)
    avgm.step(d1)
    out = avgm.step(d2)
    for n in NAMES:
        assert torch.allclose(out[n], 0.5 * (0.9 * d1[n] + d2[n]), rtol=1e-6, atol=0)


def test_adam_step_by_hand():
    """Two steps on one coordinate, t counted from 1, bias-corrected step size, tau outside the root."""
    adam = Adam(learning_rate=0.01, momentum=0.9, beta2=0.99, tau=1e-3)
    first = adam.step({"w": torch.tensor([0.02])})["w"].item()
    # m = 0.002, v = 4e-6, step = 0.01 sqrt(0.01) / 0.1 = 0.01: 0.01 * 0.002 / (0.002 + 0.001)
    assert first == pytest.approx(0.01 * 0.002 / 0.003, rel=1e-6)
    second = adam.step({"w": torch.tensor([-0.01])})["w"].item()
    m, v = 0.9 * 0.002 + 0.1 * -0.01, 0.99 * 4e-6 + 0.01 * 1e-4
    size = 0.01 * math.sqrt(1 - 0.99 ** 2) / (1 - 0.9 ** 2)
    assert second == pytest.approx(size * m / (math.sqrt(v) + 1e-3), rel=1e-6)


def _flower_reply(arrays: dict[str, np.ndarray]) -> Message:
    meta = Metadata(run_id=1, message_id="", src_node_id=5, dst_node_id=0, reply_to_message_id="m",
                    group_id="1", created_at=time.time(), ttl=3600.0, message_type="train")
    return Message(RecordDict({"arrays": ArrayRecord({n: torch.from_numpy(a) for n, a in arrays.items()}),
                               "metrics": MetricRecord({"num-examples": 1})}), metadata=meta)


FLOWER = {  # Flower's strategy with the same hyperparameters; Pollinate's adagrad with momentum 0
    "avgm": (dict(momentum=0.9, learning_rate=0.7),
             lambda: FedAvgM(server_learning_rate=0.7, server_momentum=0.9)),
    "adam": (dict(momentum=0.9, beta2=0.99, tau=1e-3, learning_rate=0.01),
             lambda: FedAdam(eta=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3)),
    "yogi": (dict(momentum=0.9, beta2=0.99, tau=1e-3, learning_rate=0.01),
             lambda: FedYogi(eta=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3)),
    "adagrad": (dict(momentum=0.0, tau=1e-3, learning_rate=0.01),
                lambda: FedAdagrad(eta=0.01, tau=1e-3)),
}


@pytest.mark.parametrize("name", sorted(FLOWER))
def test_each_optimizer_follows_flowers_strategy_on_the_same_numbers(name):
    """Four rounds: the global state Pollinate reaches equals the one Flower's strategy reaches.

    Flower's FedAdam corrects its step with ``server_round + 1``; Pollinate counts steps from
    1, so Flower is called with ``server_round = t - 1`` (the correction differs otherwise).
    """
    options, make = FLOWER[name]
    ours, flower = OPTIMIZERS[name](**options), make()
    state = {n: np.zeros((3, 4), np.float32) for n in NAMES}
    flower_state = dict(state)
    if name == "avgm":
        flower.current_arrays = ArrayRecord({n: torch.from_numpy(a) for n, a in state.items()})
    for t, d in enumerate(deltas(4, seed=1), start=1):
        applied = ours.step(d)
        state = {n: state[n] + applied[n].numpy() for n in NAMES}
        if name != "avgm":
            flower.current_arrays = flower_state
        new, _ = flower.aggregate_train(t - 1, [_flower_reply(
            {n: flower_state[n] + d[n].numpy() for n in NAMES})])
        flower_state = {n: a.numpy().astype(np.float32) for n, a in new.to_torch_state_dict().items()}
        for n in NAMES:
            np.testing.assert_allclose(state[n], flower_state[n], rtol=1e-4, atol=1e-7)
    assert any(np.abs(state[n]).max() > 1e-3 for n in NAMES)  # the runs did move


def test_tensors_absent_from_a_round_neither_move_nor_lose_their_state():
    adam = Adam()
    d1, d2 = deltas(2)
    adam.step(d1)
    out = adam.step({"lora_B": d2["lora_B"]})  # lora_A: nobody sent it this round
    assert set(out) == {"lora_B"}
    state = adam.state_dict()
    assert int(state["step/lora_A"]) == 1 and int(state["step/lora_B"]) == 2


def test_state_survives_a_checkpoint_bitwise(tmp_path):
    """Two steps, a checkpoint through the run directory's files, two more: the same bits as without."""
    rounds = deltas(4, seed=2)
    for name in SERVER_OPTIMIZERS[1:]:
        config = RunConfig(server_optimizer=name)
        straight, before = server_optimizer(config), server_optimizer(config)
        for d in rounds[:2]:
            straight.step(d)
            before.step(d)
        out = RunDirectory(tmp_path / name)
        out.save_checkpoint(Checkpoint(round=2, config={}, states={1: rounds[0]}, increments={},
                                       node_versions={}, optimizer=before.state_dict()))
        resumed = server_optimizer(config)
        resumed.load_state_dict(out.load_checkpoint().optimizer)
        for d in rounds[2:]:
            a, b = straight.step(d), resumed.step(d)
            assert all(torch.equal(a[n], b[n]) for n in NAMES), name
    with pytest.raises(ValueError, match="unexpected state 'exp_avg/lora_A'"):
        AvgM().load_state_dict({"exp_avg/lora_A": torch.zeros(1)})


@pytest.mark.parametrize("options, message", [
    ({"server_optimizer": "adamw"}, "server-optimizer must be one of none, avgm, adam, yogi, adagrad"),
    ({"server_optimizer": "adam", "server_momentum": 1.0}, "server-momentum must be in [0, 1)"),
    ({"server_optimizer": "yogi", "server_beta2": -0.1}, "server-beta2 must be in [0, 1)"),
    ({"server_optimizer": "adam", "server_tau": 0.0}, "server-tau must be > 0"),
    ({"server_optimizer": "avgm", "server_learning_rate": -1.0}, "server-learning-rate must be >= 0"),
    ({"server_momentum": 0.5}, "server-momentum=0.5 has no effect with server-optimizer=none"),
    ({"server_optimizer": "avgm", "server_beta2": 0.9}, "it is for server-optimizer adam or yogi"),
    ({"lr_schedule": "linear"}, "lr-schedule must be one of constant, cosine"),
    ({"lr_warmup_rounds": -1}, "lr-warmup-rounds must be >= 0"),
    ({"lr_warmup_rounds": 5, "num_server_rounds": 5}, "lr-warmup-rounds=5 must be below num-server-rounds=5"),
    ({"restricted_softmax": 1.5}, "restricted-softmax must be in [0, 1] (1 = off) or -1 (auto), got 1.5"),
    ({"restricted_softmax": 0.0, "dp": "sample"}, "restricted-softmax=0.0 is for task=classification"),
    ({"restricted_softmax": 0.5, "task": "causal-lm"}, "restricted-softmax=0.5 is for task=classification"),
])
def test_bad_options_are_refused_naming_the_option(options, message):
    with pytest.raises(ConfigError) as err:
        RunConfig(**options)
    assert message in str(err.value)


@pytest.mark.parametrize("aggregator, options, refused", [
    ("flexlora", {"server_optimizer": "adam"},
     "server-optimizer=adam does not work with aggregator=flexlora"),
    ("expert-routing", {"server_optimizer": "avgm"},
     "server-optimizer=avgm does not work with aggregator=expert-routing"),
    ("flora", {"client_optimizer_state": True},
     "client-optimizer-state=true does not work with aggregator=flora"),
    ("flexlora", {"client_optimizer_state": True},
     "client-optimizer-state=true does not work with aggregator=flexlora"),
    ("fedit", {"server_optimizer": "yogi", "client_optimizer_state": True}, ""),
    ("ffa", {"server_optimizer": "adam", "client_optimizer_state": True}, ""),
    ("flora", {"server_optimizer": "adam"}, ""),
    ("hetlora", {"server_optimizer": "adagrad", "client_optimizer_state": True}, ""),
    ("selective-layer", {"server_optimizer": "avgm", "client_optimizer_state": True}, ""),
    ("expert-routing", {"client_optimizer_state": True}, ""),
])
def test_pairs_a_method_defeats_are_refused_before_round_one(aggregator, options, refused):
    config = RunConfig(aggregator=aggregator, **options)
    settle = lambda: resolve(aggregator).settle_config(config, lambda _: None)  # noqa: E731
    if not refused:
        settle()
        return
    with pytest.raises(ConfigError) as err:
        settle()
    assert str(err.value).startswith(refused) and "\n" not in str(err.value)


def test_learning_rate_schedule_values():
    constant = RunConfig(num_server_rounds=5, learning_rate=0.01)
    assert [round_learning_rate(constant, r) for r in range(1, 6)] == [0.01] * 5
    warm = constant.replace(lr_warmup_rounds=2)
    assert [round_learning_rate(warm, r) for r in range(1, 6)] == pytest.approx([0.005] + [0.01] * 4)
    cosine = constant.replace(lr_schedule="cosine", lr_warmup_rounds=1)
    # round 1 warms up (1/1), rounds 2..5 decay over half a cosine from 0.01 to COSINE_FLOOR of it
    expected = [0.01] + [0.01 * (COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * k / 3)))
                         for k in range(4)]
    assert [round_learning_rate(cosine, r) for r in range(1, 6)] == pytest.approx(expected)
    assert round_learning_rate(cosine, 5) == pytest.approx(0.001)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
def test_restricted_softmax_scales_absent_classes_logits_and_at_zero_leaves_their_rows(alpha):
    """A client holding classes 0 and 1 of 4: the head's logits of 2 and 3 are scaled by alpha
    while it trains (and not after); at 0 their head rows and biases do not move at all."""
    model = build_model(ModelSpec(num_labels=4, rank=2, alpha=4.0, target_modules=("query", "value")))
    model.set_trainable(model.adapter_names)
    data = datalib.encode(datalib.generated_classification(16, seed=3), model.tokenizer, "classification", 32)
    data.labels = [i % 2 for i in range(len(data))]
    first = next(datalib.batches(data, 4, model.tokenizer.pad_token_id, shuffle=False))
    batch = {k: v for k, v in first.items() if k != "labels"}
    model.model.eval()
    with torch.no_grad():
        plain = model.model(**batch).logits
        with restricted_softmax(model.model, data, alpha):
            scaled = model.model(**batch).logits
        assert torch.equal(model.model(**batch).logits, plain)  # the hook is gone
    assert torch.allclose(scaled, plain * torch.tensor([1.0, 1.0, alpha, alpha]))
    head = {n: model.parameter(n).detach().clone() for n in model.head_names()}
    train(model, data, RunConfig(restricted_softmax=alpha, learning_rate=1e-2, batch_size=8), seed=0)
    for name, before in head.items():
        moved = (model.parameter(name).detach() - before).abs().reshape(4, -1).sum(dim=1)
        assert bool((moved[:2] > 0).all())
        assert bool((moved[2:] == 0).all()) == (alpha == 0.0)


def test_restricted_softmax_auto_is_zero_where_it_applies_and_off_elsewhere():
    assert RunConfig().absent_class_scale == 0.0
    assert RunConfig(restricted_softmax=0.5).absent_class_scale == 0.5
    assert RunConfig(dp="sample").absent_class_scale == 1.0
    assert RunConfig(task="causal-lm").absent_class_scale == 1.0


def test_node_optimizer_state_restores_moments_and_keeps_what_the_method_froze():
    """Round 1 trains every adapter tensor one AdamW step; round 2 only the head, from the saved
    state: the head continues at step 2 with its moments, the frozen LoRA tensors keep step 1."""
    model = build_model(ModelSpec(num_labels=2, rank=2, alpha=4.0, target_modules=("query", "value")))
    config = RunConfig(learning_rate=1e-2)

    def one_step(optimizer: torch.optim.Optimizer) -> None:
        for p in model.model.parameters():
            if p.requires_grad:
                p.grad = torch.full_like(p, 0.5)
        optimizer.step()

    model.set_trainable(model.adapter_names)
    first = make_optimizer(model, config)
    one_step(first)
    saved = optimizer_state(first, model, None)
    head = set(model.head_names())
    model.set_trainable(head)
    second = make_optimizer(model, config)
    load_optimizer_state(second, model, saved)
    for name in head:
        restored = second.state[model.parameter(name)]
        assert torch.equal(restored["exp_avg"], first.state[model.parameter(name)]["exp_avg"])
    one_step(second)
    steps = {k.removeprefix("step/"): int(v) for k, v in load(optimizer_state(second, model, saved)).items()
             if k.startswith("step/")}
    assert steps == {n: 2 if n in head else 1 for n in model.adapter_names}
    assert optimizer_steps(optimizer_state(second, model, saved)) == 2
    model.set_trainable(model.adapter_names)


def test_sample_dp_continues_the_kept_optimizer_state():
    """dp=sample wraps the node's optimizer, with its kept state, in opacus: the count goes on."""
    model = build_model(ModelSpec(num_labels=4))
    data = datalib.encode(datalib.generated_classification(16, seed=3), model.tokenizer, "classification", 32)
    config = RunConfig(dp="sample", noise_multiplier=0.5, batch_size=8, client_optimizer_state=True)
    memory, saved, steps = NodeMemory(), None, 0
    for _ in range(2):
        optimizer = make_optimizer(model, config)
        load_optimizer_state(optimizer, model, saved)
        steps += ClientPrivacy(config, memory, len(data)).train(model, data, optimizer).steps
        saved = optimizer_state(optimizer, model, saved)
        assert optimizer_steps(saved) == steps > 0


@pytest.mark.slow
def test_server_and_client_optimizer_state_survive_rounds_and_a_server_restart(tmp_path, monkeypatch):
    """3 clients, 3 rounds, server adam, client AdamW state, warm-up then cosine.

    Run 1 goes straight through. Run 2 is the same run whose server dies before round 3 and
    restarts from its checkpoint in the same federation (the nodes keep their memory, as
    SuperNodes do when a SuperLink restarts): it ends bitwise where run 1 ends, server
    optimizer state included. Each node reports the round's scheduled learning rate and its
    optimizer's step count, which grows by that round's steps (the state survived).
    """
    import pollinate.server.app as server_app

    config = RunConfig(num_clients=3, num_server_rounds=3, max_train_examples=40, test_examples=40,
                       batch_size=16, learning_rate=5e-3, server_optimizer="adam",
                       client_optimizer_state=True, lr_schedule="cosine", lr_warmup_rounds=1,
                       codec="fp32", downlink_codec="fp32", out=str(tmp_path / "straight"), resume=False)
    simulate(config)
    restarted = config.replace(out=str(tmp_path / "restarted"))

    def restarting_app(cfg: RunConfig) -> ServerApp:
        app = ServerApp()

        @app.main()
        def main(grid, context) -> None:  # noqa: ANN001
            with pytest.raises(ServerKilled):
                server_app.run(cfg, KilledGrid(grid, rounds=2), context.run_id)
            server_app.run(cfg.replace(resume=True), grid, context.run_id)

        return app

    monkeypatch.setattr(server_app, "make_app", restarting_app)
    simulate(restarted)
    monkeypatch.undo()

    first, second = (RunDirectory(c.out).load_checkpoint() for c in (config, restarted))
    assert second.round == first.round == 3 and sorted(first.states) == sorted(second.states) == [1, 2, 3, 4]
    for version, state in first.states.items():
        assert all(torch.equal(t, second.states[version][n]) for n, t in state.items()), version
    assert first.optimizer.keys() == second.optimizer.keys() and first.optimizer
    assert all(torch.equal(t, second.optimizer[k]) for k, t in first.optimizer.items())
    assert {int(t) for k, t in first.optimizer.items() if k.startswith("step/")} == {3}

    steps: dict[int, int] = {}
    for record in RunDirectory(config.out).read_metrics()[1:]:
        clients = record["client_metrics"]
        assert len(clients) == 3 and all(c["used"] for c in clients)
        for c in clients:
            assert c["learning-rate"] == pytest.approx(round_learning_rate(config, record["round"]))
            steps[c["node"]] = steps.get(c["node"], 0) + c["steps"]
            assert c["optimizer-steps"] == steps[c["node"]]  # last round's state, plus this round's steps
    assert len(steps) == 3
    rates = [round_learning_rate(config, r) for r in (1, 2, 3)]
    assert rates == pytest.approx([5e-3, 5e-3, 5e-4])  # warm-up 1/1, cosine from the top to 10%
