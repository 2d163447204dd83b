"""Differential privacy: DP-SGD mechanics, client-level clipping and noise, accounting in a federation."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.serverapp import ServerApp
from killed_server import KilledGrid, ServerKilled
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from peft import LoraConfig, PrefixTuningConfig, get_peft_model
from transformers import AutoModelForSequenceClassification

from pollinate import data as datalib
from pollinate.aggregators import ClientUpdate, resolve
from pollinate.client.privacy import ClientPrivacy, example_losses, private_optimizer, private_step
from pollinate.client.state import NodeMemory
from pollinate.client.trainer import make_optimizer
from pollinate.config import ConfigError, RunConfig
from pollinate.modeling import AdapterModel, ModelSpec, build_model, canonical_name, default_model_path
from pollinate.privacy import INSECURE_NOISE_SEED, Budget, PrivacyError, check_private, clip, l2_norm
from pollinate.server.app import run
from pollinate.server.privacy import CentralDP, private_aggregator
from pollinate.server.rundir import RunDirectory
from pollinate.simulations.launch import simulate


def opacus_epsilon(noise: float, sample_rate: float, steps: int, delta: float = 1e-5) -> float:
    accountant = RDPAccountant()
    accountant.history = [(noise, sample_rate, steps)]
    return accountant.get_epsilon(delta)


@pytest.fixture(scope="module")
def model() -> AdapterModel:
    return build_model(ModelSpec(num_labels=4))


@pytest.fixture(scope="module")
def batch(model) -> dict[str, torch.Tensor]:
    table = datalib.generated_classification(8, seed=3)
    enc = datalib.encode(table, model.tokenizer, "classification", 32)
    return datalib.collate(enc.input_ids, enc.labels, model.tokenizer.pad_token_id, "cpu")


@pytest.mark.parametrize("key,value,needle", [
    ("dp", "maybe", "dp must be one of"),
    ("target-epsilon", 0, "target-epsilon must be > 0"),
    ("target-epsilon", -2.0, "target-epsilon must be > 0"),
    ("delta", 0.0, "delta must be in (0, 1)"),
    ("delta", 1.0, "delta must be in (0, 1)"),
    ("noise-multiplier", -0.5, "noise-multiplier must be >= 0"),
    ("clip-norm", 0.0, "clip-norm must be > 0"),
])
def test_bad_options_name_the_option(key, value, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        RunConfig.from_mapping({"dp": "sample", key: value})


def test_sample_dp_needs_a_clipping_norm():
    with pytest.raises(ConfigError, match="max-grad-norm must be > 0 with dp=sample"):
        RunConfig(dp="sample", max_grad_norm=0.0)


def test_private_step_without_noise_or_clipping_equals_a_plain_step(model, batch):
    init = model.adapter_state()
    model.model.train()

    def sgd():
        return torch.optim.SGD([p for p in model.model.parameters() if p.requires_grad], lr=0.5)

    torch.manual_seed(0)  # same dropout masks in both steps
    optimizer = sgd()
    model.model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    plain = model.adapter_state()
    model.load_adapter_state(init)
    torch.manual_seed(0)
    with private_optimizer(model, sgd(), noise=0.0, max_grad_norm=1e9,
                           expected_batch_size=len(batch["labels"])) as dp:
        private_step(model, dp, batch)
    private = model.adapter_state()
    model.load_adapter_state(init)
    assert any(not torch.equal(plain[n], init[n]) for n in init)
    for name in init:
        assert torch.allclose(private[name], plain[name], atol=1e-6, rtol=1e-4), name


def test_optimizer_option_sgd_steps_with_the_gradient_adamw_by_the_learning_rate(model, batch):
    """What ``optimizer=sgd`` is for under DP: a first step proportional to the gradient."""
    init = model.adapter_state()
    model.model.train()
    steps = {}
    for name in ("sgd", "adamw"):
        model.load_adapter_state(init)
        optimizer = make_optimizer(model, RunConfig(optimizer=name, learning_rate=0.01))
        torch.manual_seed(0)
        model.model(**batch).loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.model.named_parameters() if p.requires_grad}
        optimizer.step()
        optimizer.zero_grad()
        steps[name] = {n: t - init[n] for n, t in model.adapter_state().items()}
    model.load_adapter_state(init)
    # adapter_state names are canonical, parameter names are peft's: compare the sorted magnitudes
    def magnitudes(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.flatten() for t in tensors.values()]).abs().sort().values

    magnitude = {k: magnitudes(v) for k, v in steps.items()}
    gradient = magnitudes(grads)
    assert gradient[-1] > 0
    assert torch.allclose(magnitude["sgd"], 0.01 * gradient, atol=1e-7)
    moved = gradient > 1e-6
    assert torch.allclose(magnitude["adamw"][moved], torch.full_like(gradient[moved], 0.01), rtol=1e-2)


def test_per_sample_gradients_sum_to_the_batch_gradient_and_hooks_leave_no_trace(model, batch):
    model.model.train()
    optimizer = torch.optim.SGD([p for p in model.model.parameters() if p.requires_grad], lr=0.1)
    with private_optimizer(model, optimizer, noise=0.0, max_grad_norm=1.0, expected_batch_size=8) as dp:
        example_losses(model, batch).mean().backward()
        checked = 0
        for name in model.adapter_names:
            p = model.parameter(name)
            assert p.grad_sample.shape == (8, *p.shape)
            assert torch.allclose(p.grad_sample.sum(0), p.grad * 8, atol=1e-5, rtol=1e-4), name
            checked += "lora_" in name
        assert checked == len(model.lora_layers()) * 2
        dp.zero_grad(set_to_none=True)
    params = list(model.model.parameters())
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "_forward_counter") for p in params)
    assert not any(m._forward_hooks or m._backward_hooks for m in model.model.modules())
    assert not any("_module." in k for k in model.model.state_dict())
    assert set(model.adapter_state()) == set(model.adapter_names)


def test_canonical_names_drop_the_opacus_wrapper_prefix(model):
    wrapped = GradSampleModule(model.model)
    try:
        assert all(n.startswith("_module.") for n, _ in wrapped.named_parameters())
        trainable = {canonical_name(n) for n, p in wrapped.named_parameters() if p.requires_grad}
        assert trainable == set(model.adapter_names)
    finally:
        wrapped.to_standard_module()


def test_adapters_opacus_cannot_privatise_are_refused(model):
    check_private(model.model)
    with pytest.raises(PrivacyError, match="embedding layer"):
        check_private(build_model(ModelSpec(num_labels=4, target_modules=("word_embeddings",))).model)

    def base():
        return AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=4)

    dora = get_peft_model(base(), LoraConfig(r=4, target_modules=["query"], use_dora=True))
    with pytest.raises(PrivacyError, match="DoRA"):
        check_private(dora)
    prefix = get_peft_model(base(), PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    with pytest.raises(PrivacyError, match="PREFIX_TUNING"):
        check_private(prefix)
    with pytest.raises(PrivacyError, match="embedding layer"):
        private_aggregator(resolve("fedit")(), RunConfig(dp="sample"),
                           build_model(ModelSpec(num_labels=4, target_modules=("word_embeddings",))))


def test_client_level_dp_refuses_full_factor_methods_and_mixed_ranks(model):
    with pytest.raises(PrivacyError, match="'flora' sends full re-initialised"):
        private_aggregator(resolve("flora")(), RunConfig(dp="client-central", aggregator="flora"), model)
    with pytest.raises(PrivacyError, match="every client needs LoRA rank 8"):
        private_aggregator(resolve("fedit")(), RunConfig(dp="client-central", rank_profile="8,4"), model)


def test_clipping_bounds_every_update_and_noise_has_the_configured_std():
    gen = torch.Generator().manual_seed(0)
    for scale in (1e-3, 0.05, 1.0, 30.0):
        update = {"a": scale * torch.randn(40, 30, generator=gen),
                  "b": scale * torch.randn(17, generator=gen)}
        clipped = clip(update, 1.0)
        assert l2_norm(clipped) <= 1.0 + 1e-5
        factor = min(1.0, 1.0 / l2_norm(update))
        for name in update:
            assert torch.allclose(clipped[name], update[name] * factor, rtol=1e-5, atol=1e-8)

    # central: sum of clipped updates + N(0, (sigma C)^2), divided by the m sampled clients
    sigma, c, m, population = 0.8, 0.5, 4, 10
    shape = (200, 400)
    updates = [{"w": torch.randn(shape, generator=gen) * s} for s in (1e-4, 1e-3, 1.0, 3.0)]
    central = CentralDP(resolve("fedit")(), template={"w": torch.zeros(shape)}, rank=8, alpha=16.0,
                        clip_norm=c, noise_multiplier=sigma, budget=Budget(8.0, 1e-5), rounds=1,
                        generator=torch.Generator().manual_seed(1))
    assert central.plan(1, population, m)
    central.instructions(1, list(range(m)))
    central.begin(1, {"w": torch.zeros(shape)})
    for node, u in enumerate(updates):
        update = ClientUpdate(node, u, num_examples=10 * (node + 1), rank=8, alpha=16.0)
        central.check(update)
        central.accumulate(update)
    noise = central.finalize()["w"] - sum(clip(u, c)["w"] for u in updates) / m
    assert abs(float(noise.mean())) < 3 * sigma * c / m / math.sqrt(noise.numel())
    assert float(noise.std()) == pytest.approx(sigma * c / m, rel=0.02)
    assert central.epsilon == pytest.approx(opacus_epsilon(sigma, m / population, 1))

    # local: each client noises its own clipped update with std sigma C before sending it
    config = RunConfig(dp="client-local", noise_multiplier=0.5, clip_norm=2.0)
    memory = NodeMemory()
    privacy = ClientPrivacy(config, memory, num_examples=100)
    update = {"w": torch.randn(shape, generator=gen)}
    local_noise = privacy.privatize(update)["w"] - clip(update, 2.0)["w"]
    assert float(local_noise.std()) == pytest.approx(1.0, rel=0.02)
    assert privacy.metrics()["epsilon"] == pytest.approx(opacus_epsilon(0.5, 1.0, 1))
    again = ClientPrivacy(config, memory, num_examples=100)  # the next round reads the stored accountant
    again.privatize(update)
    assert again.metrics()["epsilon"] == pytest.approx(opacus_epsilon(0.5, 1.0, 2))


@pytest.mark.slow
def test_sample_dp_federation_accounts_stops_exhausted_clients_and_learns(tmp_path, monkeypatch):
    """3 clients (Dirichlet sizes 400, 185, 400), 3 rounds of 4 DP-SGD steps at noise 0.7.

    The target epsilon lies between what the small client (sampling rate 1/3) spends in 2
    and in 3 rounds and above what the others spend in 3 (rate 1/7), so exactly the small
    client refuses round 3 and the other two finish it. The DP noise comes from the
    test-only seeded source (not private), so the learning bar does not depend on OS entropy.
    """
    monkeypatch.setenv(INSECURE_NOISE_SEED, "1")
    sigma, batch_size, steps = 0.7, 64, 4
    config = RunConfig(num_clients=3, num_server_rounds=3, max_train_examples=400, test_examples=200,
                       batch_size=batch_size, local_steps=steps, learning_rate=2e-2, dp="sample",
                       noise_multiplier=sigma, out=str(tmp_path), resume=False)
    table = datalib.train_table(config)
    sizes = sorted(len(datalib.client_table(config, table, i, 3)) for i in range(3))

    def rate(n: int) -> float:
        return 1 / math.ceil(n / batch_size)

    small = sizes[0]
    assert opacus_epsilon(sigma, rate(sizes[-1]), 3 * steps) < opacus_epsilon(sigma, rate(small), 2 * steps)
    target = sum(opacus_epsilon(sigma, rate(small), k * steps) for k in (2, 3)) / 2
    summary = simulate(config.replace(target_epsilon=target))

    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2, 3]
    assert [r["clients"] for r in summary["rounds"][1:]] == [3, 3, 2]
    trained: dict[int, list[float]] = {}
    refused: dict[int, int] = {}
    examples: dict[int, int] = {}
    for record in RunDirectory(config.out).read_metrics()[1:]:
        for entry in record["client_metrics"]:
            if entry["status"] == "exhausted":
                refused[entry["node"]] = record["round"]
                continue
            history = trained.setdefault(entry["node"], [])
            history.append(entry["epsilon"])
            expected = opacus_epsilon(sigma, rate(entry["num_examples"]), steps * len(history))
            assert entry["epsilon"] == pytest.approx(expected, rel=1e-9)
            assert entry["epsilon"] <= target
            examples[entry["node"]] = entry["num_examples"]
        assert record["epsilon"] == max(e["epsilon"] for e in record["client_metrics"] if e.get("used"))
    assert all(eps == sorted(eps) and len(set(eps)) == len(eps) for eps in trained.values())
    assert list(refused.values()) == [3]
    assert summary["exhausted_clients"] == list(refused)
    assert len(trained[next(iter(refused))]) == 2 and examples[next(iter(refused))] == small
    # final accuracy over noise seeds 1-5 (CPU, 2 cores, torch 2.13): 0.870, 0.885, 0.525, 0.765,
    # 0.675; chance is 0.25. The bar sits under the minimum with margin.
    assert summary["final"]["accuracy"] >= 0.45, summary["final"]


@pytest.mark.slow
def test_client_level_epsilon_is_recomputed_exactly_for_the_nodes_that_exist_and_across_a_resume(
        tmp_path, monkeypatch):
    """Central DP with 3 nodes of num-clients=10, 2 sampled per round: q = 2/3, not 2/10.

    Run 1 plans 3 rounds (sigma solved once, for 3 rounds at q = 2/3) and is killed in
    round 2. Run 2 resumes it with num-server-rounds=4: rounds 2 and 3 run at the stored
    sigma on the stored history, and round 4, which would exceed target-epsilon, is
    refused before any node is sampled. Every reported epsilon equals opacus' RDP
    accountant replayed from the logged events (population, sampled, sigma, one step).
    """
    import pollinate.server.app as server_app

    target, delta = 8.0, 1e-5
    config = RunConfig(num_clients=10, num_server_rounds=3, fraction_train=0.5, max_train_examples=40,
                       test_examples=50, dp="client-central", target_epsilon=target, delta=delta,
                       out=str(tmp_path), resume=False)

    def killed_app(cfg: RunConfig) -> ServerApp:
        app = ServerApp()

        @app.main()
        def main(grid, context) -> None:  # noqa: ANN001
            run(cfg, KilledGrid(grid, rounds=1), context.run_id)

        return app

    monkeypatch.setattr(server_app, "make_app", killed_app)
    with pytest.raises(ServerKilled):
        simulate(config, num_supernodes=3)
    monkeypatch.undo()
    assert RunDirectory(config.out).load_checkpoint().round == 1
    summary = simulate(config.replace(num_server_rounds=4, resume=True), num_supernodes=3)

    records = RunDirectory(config.out).read_metrics()[1:]
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    sigma = get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=2 / 3, steps=3,
                                 accountant="rdp")
    events: list[tuple[float, float, int]] = []
    for record in records[:3]:
        logged = record["aggregator"]
        assert (logged["population"], logged["sampled"], record["clients"]) == (3, 2, 2)
        assert logged["noise_multiplier"] == sigma  # solved once, kept by the resumed run
        events.append((logged["noise_multiplier"], logged["sampled"] / logged["population"], 1))
        accountant = RDPAccountant()
        accountant.history = list(events)
        assert record["epsilon"] == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)
    refused = records[3]
    assert refused["clients"] == 0 and refused["client_metrics"] == []
    assert "would exceed target-epsilon" in refused["aggregator"]["refused"]
    assert refused["epsilon"] == records[2]["epsilon"] <= target
    assert summary["final"]["epsilon"] == records[2]["epsilon"]
