"""The math of the aggregation methods: exactness, rank handling, wire forms, rejections.

Tiny synthetic tensors for the math; the real MiniLM model (built once) only for what
the client halves do to a model.
"""

from __future__ import annotations

import pytest
import torch

from pollinate.aggregators import AggregationError, ClientUpdate, UnknownAggregator, resolve
from pollinate.aggregators.fedit import FedIT
from pollinate.aggregators.ffa import FFA
from pollinate.aggregators.flexlora import FlexLoRA
from pollinate.aggregators.flexlora import client_factors as flex_factors
from pollinate.aggregators.flora import FLoRA
from pollinate.aggregators.hetlora import HetLoRA
from pollinate.aggregators.hetlora import client_factors as het_factors
from pollinate.aggregators.lora_math import product_change_norm, svd_truncate

LAYERS = ("enc.0.q", "enc.1.v")
HEAD = "classifier.weight"


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.linalg.norm(x - y) / torch.linalg.norm(y))


class FakeModel:
    """The few AdapterModel methods initial_state/specs use, over synthetic tensors."""

    def __init__(self, out: int, inn: int, rank: int, alpha: float = 16.0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.state = {HEAD: torch.randn(2, inn, generator=g)}
        for layer in LAYERS:
            self.state[f"{layer}.lora_A.weight"] = torch.randn(rank, inn, generator=g) / inn
            self.state[f"{layer}.lora_B.weight"] = torch.zeros(out, rank)
        self.adapter_names = tuple(self.state)
        self.scaling = alpha / rank

    def adapter_state(self):
        return {n: t.clone() for n, t in self.state.items()}

    def lora_layers(self):
        return list(LAYERS)

    def head_names(self):
        return [HEAD]


def factors(ranks, out, inn, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{layer: (torch.randn(out, r, generator=g), torch.randn(r, inn, generator=g))
             for layer in LAYERS} for r in ranks]


def full_update(node, layer_factors, n, alpha, head_delta=None):
    delta = {}
    for layer, (b, a) in layer_factors.items():
        delta[f"{layer}.lora_B.weight"], delta[f"{layer}.lora_A.weight"] = b, a
    if head_delta is not None:
        delta[HEAD] = head_delta
    rank = next(iter(layer_factors.values()))[1].shape[0]
    return ClientUpdate(node_id=node, delta=delta, num_examples=n, rank=rank, alpha=alpha)


def run_round(agg, state, updates, rnd=1):
    agg.begin(rnd, state)
    for update in updates:
        agg.check(update)
        agg.accumulate(update)
    return agg.finalize()


# -- FLoRA ----------------------------------------------------------------------------

RANKS, ALPHAS, NS = (8, 4, 2), (16.0, 8.0, 32.0), (10, 30, 60)


def test_flora_is_exact_with_mixed_ranks_and_partial_rounds():
    out, inn = 32, 24
    agg = FLoRA()
    state = agg.initial_state(FakeModel(out, inn, rank=8))
    assert set(state) == {HEAD} | {f"{layer}.delta_weight" for layer in LAYERS}
    fs = factors(RANKS, out, inn)
    heads = [torch.randn(2, inn) for _ in RANKS]
    updates = [full_update(k, fs[k], NS[k], ALPHAS[k], heads[k]) for k in range(3)]

    delta = run_round(agg, state, updates)
    total = sum(NS)
    for layer in LAYERS:
        exact = sum(NS[k] / total * ALPHAS[k] / RANKS[k] * fs[k][layer][0] @ fs[k][layer][1]
                    for k in range(3))
        assert rel(delta[f"{layer}.delta_weight"], exact) < 1e-5
    assert rel(delta[HEAD], sum(NS[k] * heads[k] for k in range(3)) / total) < 1e-6
    assert agg.metrics()["stacked_rank"] == sum(RANKS)

    # client 1 drops out; client 2 sends no factors for the second layer
    partial = [updates[0], full_update(2, {LAYERS[0]: fs[2][LAYERS[0]]}, NS[2], ALPHAS[2])]
    delta = run_round(agg, state, partial, rnd=2)
    for layer, senders in ((LAYERS[0], (0, 2)), (LAYERS[1], (0,))):
        total = sum(NS[k] for k in senders)
        exact = sum(NS[k] / total * ALPHAS[k] / RANKS[k] * fs[k][layer][0] @ fs[k][layer][1]
                    for k in senders)
        assert rel(delta[f"{layer}.delta_weight"], exact) < 1e-5
        assert agg._stacks[layer][1].shape[0] == sum(RANKS[k] for k in senders)
    assert torch.allclose(delta[HEAD], heads[0])  # only client 0 sent the head


def test_flora_downlink_sends_the_cheaper_form_and_round_trips():
    out, inn = 40, 24  # stacked rank 14: 14 * (40 + 24) < 40 * 24 -> factors
    agg = FLoRA()
    model = FakeModel(out, inn, rank=8)
    state = agg.initial_state(model)
    fs = factors(RANKS, out, inn)
    delta = run_round(agg, state, [full_update(k, fs[k], NS[k], ALPHAS[k]) for k in range(3)])
    part = FLoRA.client_part({}, {})

    wire = agg.pack_downlink(delta, latest_round=True)
    for layer in LAYERS:
        assert f"{layer}.delta_weight" not in wire
        assert wire[f"{layer}.stack_B"].shape == (out, 14)
        assert wire[f"{layer}.stack_A"].shape == (14, inn)
    agg.downlink_spec(model).check_all(wire)
    back = part.unpack_downlink(wire)
    assert set(back) == set(delta)
    for name in delta:
        assert rel(back[name], delta[name]) < 1e-6

    # an older version (or a delta that is not this round's product) goes dense
    assert set(agg.pack_downlink(delta, latest_round=False)) == set(delta)
    shifted = {n: t + 1.0 for n, t in delta.items()}
    assert set(agg.pack_downlink(shifted, latest_round=True)) == set(delta)

    # small layers: R (out + in) >= out * in -> dense even for the latest round
    small = FLoRA()
    sstate = small.initial_state(FakeModel(8, 8, rank=8))
    sdelta = run_round(small, sstate, [full_update(k, f, NS[k], ALPHAS[k])
                                       for k, f in enumerate(factors(RANKS, 8, 8))])
    assert set(small.pack_downlink(sdelta, latest_round=True)) == set(sdelta)


# -- FedIT inexact, FFA exact ----------------------------------------------------------

def test_fedit_is_inexact_and_ffa_exact_on_the_same_inputs():
    out, inn, r, alpha = 32, 24, 4, 8.0
    s = alpha / r
    g = torch.Generator().manual_seed(3)
    a0 = torch.randn(r, inn, generator=g)
    b0 = torch.zeros(out, r)
    state = {f"{layer}.lora_A.weight": a0.clone() for layer in LAYERS}
    state |= {f"{layer}.lora_B.weight": b0.clone() for layer in LAYERS}
    state[HEAD] = torch.zeros(2, inn)
    d_as = [torch.randn(r, inn, generator=g) * 0.5 for _ in NS]
    d_bs = [torch.randn(out, r, generator=g) for _ in NS]
    total = sum(NS)

    def fedit_update(k):
        delta = {f"{layer}.lora_A.weight": d_as[k] for layer in LAYERS}
        delta |= {f"{layer}.lora_B.weight": d_bs[k] for layer in LAYERS}
        return ClientUpdate(node_id=k, delta=delta, num_examples=NS[k], rank=r, alpha=alpha)

    delta = run_round(FedIT(), state, [fedit_update(k) for k in range(3)])
    layer = LAYERS[0]
    merged = s * ((b0 + delta[f"{layer}.lora_B.weight"]) @ (a0 + delta[f"{layer}.lora_A.weight"])
                  - b0 @ a0)
    exact = sum(NS[k] / total * s * ((b0 + d_bs[k]) @ (a0 + d_as[k]) - b0 @ a0) for k in range(3))
    assert rel(merged, exact) > 1e-3

    # the same clients as FLoRA sees them (fresh factors B_k, A_k): exact
    fdelta = run_round(FLoRA(), FLoRA().initial_state(FakeModel(out, inn, r)),
                       [full_update(k, {ly: (b0 + d_bs[k], a0 + d_as[k]) for ly in LAYERS},
                                    NS[k], alpha) for k in range(3)])
    assert rel(fdelta[f"{layer}.delta_weight"], exact) < 1e-5

    # FFA: A frozen and shared, only B moves
    ffa_updates = [ClientUpdate(node_id=k, delta={f"{ly}.lora_B.weight": d_bs[k] for ly in LAYERS},
                                num_examples=NS[k], rank=r, alpha=alpha) for k in range(3)]
    delta = run_round(FFA(), state, ffa_updates)
    assert not any(".lora_A" in n for n in delta)
    merged = s * (b0 + delta[f"{layer}.lora_B.weight"]) @ a0 - s * b0 @ a0
    exact = sum(NS[k] / total * s * (b0 + d_bs[k]) @ a0 for k in range(3))
    assert rel(merged, exact) < 1e-5


def test_ffa_specs_and_downlink_leave_a_alone():
    agg = FFA()
    model = FakeModel(16, 12, rank=4)
    assert not any(".lora_A" in n for n in agg.uplink_spec(model))
    state = agg.initial_state(model)
    first = agg.pack_downlink(state, latest_round=False)  # a new client: A is sent
    assert all(f"{ly}.lora_A.weight" in first for ly in LAYERS)
    later = {n: torch.zeros_like(t) if ".lora_A" in n else t + 1 for n, t in state.items()}
    assert not any(".lora_A" in n for n in agg.pack_downlink(later, latest_round=True))


# -- HetLoRA ------------------------------------------------------------------------

def test_hetlora_pads_weights_by_update_norm_and_truncates_back():
    out, inn, big = 16, 12, 8
    alpha = 16.0
    agg = HetLoRA()
    model = FakeModel(out, inn, rank=big, alpha=alpha)
    state = agg.initial_state(model)
    state = {n: t + 0.1 * torch.randn_like(t) for n, t in state.items()}  # B != 0
    s_g = alpha / big
    instructions = agg.instructions(1, [0, 1, 2])
    assert instructions[2]["global_scaling"] == s_g

    g = torch.Generator().manual_seed(5)
    deltas = [{f"{ly}.lora_A.weight": torch.randn(r, inn, generator=g) for ly in LAYERS}
              | {f"{ly}.lora_B.weight": torch.randn(out, r, generator=g) for ly in LAYERS}
              for r in RANKS]
    updates = [ClientUpdate(node_id=k, delta=deltas[k], num_examples=NS[k], rank=RANKS[k],
                            alpha=alpha) for k in range(3)]
    delta = run_round(agg, state, updates)

    layer = LAYERS[1]
    a_n, b_n = f"{layer}.lora_A.weight", f"{layer}.lora_B.weight"
    assert delta[a_n].shape == (big, inn) and delta[b_n].shape == (out, big)
    weights, pads_a, pads_b = [], [], []
    for k, r in enumerate(RANKS):
        s_k = alpha / r
        b0, a0 = state[b_n][:, :r] * (s_g / s_k), state[a_n][:r]  # what client k loaded
        b1, a1 = b0 + deltas[k][b_n], a0 + deltas[k][a_n]
        weights.append(NS[k] * float(torch.linalg.norm(s_k * (b1 @ a1 - b0 @ a0))))
        pads_a.append(torch.cat([deltas[k][a_n], torch.zeros(big - r, inn)]))
        pads_b.append(torch.cat([deltas[k][b_n] * (s_k / s_g), torch.zeros(out, big - r)], 1))
    expect_a = sum(w * p for w, p in zip(weights, pads_a, strict=True)) / sum(weights)
    expect_b = sum(w * p for w, p in zip(weights, pads_b, strict=True)) / sum(weights)
    assert rel(delta[a_n], expect_a) < 1e-5 and rel(delta[b_n], expect_b) < 1e-5

    new_state = {n: state[n] + delta.get(n, 0) for n in state}
    for r in RANKS:
        b, a = het_factors(new_state, layer, r, s_g / (alpha / r))
        assert b.shape == (out, r) and a.shape == (r, inn)
        # the client's adapter is the global one truncated to rank r
        trunc = s_g * new_state[b_n][:, :r] @ new_state[a_n][:r]
        assert rel(alpha / r * b @ a, trunc) < 1e-6


def test_product_change_norm_matches_dense():
    g = torch.Generator().manual_seed(7)
    b0, a0 = torch.randn(9, 3, generator=g), torch.randn(3, 7, generator=g)
    b1, a1 = b0 + 1e-3 * torch.randn(9, 3, generator=g), a0 + 1e-3 * torch.randn(3, 7, generator=g)
    dense = float(torch.linalg.norm(b1.double() @ a1.double() - b0.double() @ a0.double()))
    assert product_change_norm(b0, a0, b1, a1) == pytest.approx(dense, rel=1e-4)


# -- FlexLoRA -----------------------------------------------------------------------

def test_flexlora_product_is_truncated_svd_of_the_weighted_sum():
    out, inn = 20, 16
    agg = FlexLoRA()
    state = agg.initial_state(FakeModel(out, inn, rank=8))
    state[f"{LAYERS[0]}.delta_weight"] = torch.randn(out, inn)  # some earlier rounds
    fs = factors(RANKS, out, inn, seed=9)
    delta = run_round(agg, state, [full_update(k, fs[k], NS[k], ALPHAS[k]) for k in range(3)])

    total = sum(NS)
    for layer in LAYERS:
        name = f"{layer}.delta_weight"
        summed = sum(NS[k] / total * ALPHAS[k] / RANKS[k] * fs[k][layer][0] @ fs[k][layer][1]
                     for k in range(3))
        new = state[name] + delta[name]
        assert rel(new, summed) < 1e-5
        u, s, vh = torch.linalg.svd(summed.double())
        for r, alpha in zip(RANKS, ALPHAS, strict=True):
            b, a = flex_factors(new, r, alpha / r)
            assert b.shape == (out, r) and a.shape == (r, inn)
            truncation = (u[:, :r] * s[:r]) @ vh[:r]
            assert rel(alpha / r * b.double() @ a.double(), truncation) < 1e-4


def test_svd_truncate_marks_dead_directions():
    m = torch.randn(10, 2) @ torch.randn(2, 6)  # rank 2
    b, a, live = svd_truncate(m, 4, scaling=2.0)
    assert live.tolist() == [True, True, False, False]
    assert rel(2.0 * b @ a, m) < 1e-5
    assert not a[2:].any() and not b[:, 2:].any()
    b, a, live = svd_truncate(torch.zeros(5, 3), 4)
    assert not live.any() and b.shape == (5, 4) and a.shape == (4, 3)


# -- rejections and the registry ----------------------------------------------------------

def test_bad_updates_raise_and_change_nothing():
    out, inn = 16, 12
    fs = factors((8, 4), out, inn)
    good = full_update(0, fs[0], 10, 16.0)
    for agg in (FLoRA(), FlexLoRA()):
        state = agg.initial_state(FakeModel(out, inn, rank=8))
        reference = run_round(type(agg)(), state, [good])
        bad_updates = [
            ClientUpdate(0, {"nope.weight": torch.zeros(2)}, 10, 8, 16.0),
            ClientUpdate(0, {f"{LAYERS[0]}.lora_A.weight": torch.zeros(4, inn + 1),
                             f"{LAYERS[0]}.lora_B.weight": torch.zeros(out, 4)}, 10, 4, 16.0),
            ClientUpdate(0, {f"{LAYERS[0]}.lora_A.weight": torch.zeros(4, inn),
                             f"{LAYERS[0]}.lora_B.weight": torch.zeros(out, 4)}, 10, 8, 16.0),
            ClientUpdate(0, {f"{LAYERS[0]}.lora_A.weight": torch.zeros(4, inn)}, 10, 4, 16.0),
            ClientUpdate(0, {HEAD: torch.zeros(3, inn)}, 10, 4, 16.0),
            ClientUpdate(0, {HEAD: torch.full((2, inn), float("nan"))}, 10, 4, 16.0),
            full_update(0, fs[1], 0, 16.0),
        ]
        agg.begin(1, state)
        for bad in bad_updates:
            with pytest.raises(AggregationError):
                agg.check(bad)
        agg.check(good)
        agg.accumulate(good)
        result = agg.finalize()
        assert all(torch.equal(result[n], reference[n]) for n in reference)

    factor_state = FakeModel(out, inn, rank=4).adapter_state()
    mixed = ClientUpdate(1, {f"{LAYERS[0]}.lora_B.weight": torch.zeros(out, 2)}, 5, 2, 16.0)
    for agg in (FedIT(), FFA()):
        agg.begin(1, factor_state)
        with pytest.raises(AggregationError, match="rank|shape"):
            agg.check(mixed)
    ffa = FFA()
    ffa.begin(1, factor_state)
    with pytest.raises(AggregationError, match="frozen"):
        ffa.check(ClientUpdate(1, {f"{LAYERS[0]}.lora_A.weight": torch.zeros(4, inn)}, 5, 4, 8.0))
    ok = ClientUpdate(1, {f"{LAYERS[0]}.lora_B.weight": torch.zeros(out, 4)}, 5, 4, 8.0)
    ffa.check(ok)
    ffa.accumulate(ok)
    with pytest.raises(AggregationError, match="scaling"):
        ffa.check(ClientUpdate(2, {f"{LAYERS[0]}.lora_B.weight": torch.zeros(out, 4)}, 5, 4, 4.0))
    het = HetLoRA()
    het.begin(1, factor_state)
    with pytest.raises(AggregationError, match="maximum"):
        het.check(full_update(3, fs[0], 5, 16.0))  # rank 8 > global 4


def test_registry_resolves_methods_and_names_known_ones():
    for name, cls in (("ffa", FFA), ("flora", FLoRA), ("hetlora", HetLoRA),
                      ("flexlora", FlexLoRA), ("fedit", FedIT)):
        assert resolve(name) is cls and cls.name == name
    with pytest.raises(UnknownAggregator, match="flora"):
        resolve("nope")


# -- client halves on the real model --------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    from pollinate.modeling import ModelSpec, build_model

    return build_model(ModelSpec(num_labels=2, rank=4, alpha=8.0))


def test_client_parts_on_a_real_model(model):
    layers = model.lora_layers()
    layer = layers[0]
    a_n, b_n = f"{layer}.lora_A.weight", f"{layer}.lora_B.weight"
    out, inn = model.parameter(b_n).shape[0], model.parameter(a_n).shape[1]
    g = torch.Generator().manual_seed(11)

    # FLoRA: base weight = pretrained + delta_weight, fresh seeded LoRA, full factors sent
    flora = FLoRA(seed=3)
    state = {n: t + 0.01 for n, t in flora.initial_state(model).items()}
    seed = flora.instructions(2, [7])[7]
    part = FLoRA.client_part(flora.options, seed)
    base = model.parameter(f"{layer}.base_layer.weight")
    pretrained = base.detach().clone()
    part.load_global(model, state)
    assert torch.allclose(base.detach(), pretrained + 0.01)
    first = model.adapter_state()
    assert not first[b_n].any() and first[a_n].any()
    part.load_global(model, state)
    assert torch.equal(model.adapter_state()[a_n], first[a_n])  # same seed, same init
    other = FLoRA.client_part(flora.options, flora.instructions(2, [8])[8])
    other.load_global(model, state)
    assert not torch.equal(model.adapter_state()[a_n], first[a_n])
    part.prepare(model, None, [])
    start = model.adapter_state()
    sent = part.update(model, start)
    assert torch.equal(sent[a_n], start[a_n]) and not sent["classifier.weight"].any()
    assert not part.uses_error_feedback
    model.reset_base()

    # HetLoRA: a rank-8 global is truncated to this rank-4 client, B rescaled
    het_state = {n: torch.randn(out, 8, generator=g) if n.endswith("lora_B.weight")
                 else torch.randn(8, inn, generator=g) if n.endswith("lora_A.weight") else t
                 for n, t in model.adapter_state().items()}
    s_g = 8.0 / 8
    HetLoRA.client_part({}, {"global_scaling": s_g}).load_global(model, het_state)
    loaded = model.adapter_state()
    assert torch.equal(loaded[a_n], het_state[a_n][:4])
    assert torch.allclose(loaded[b_n], het_state[b_n][:, :4] * s_g / model.scaling)

    # FlexLoRA: s B A = rank-4 truncation of delta_weight; dead directions stay trainable
    flex_state = FlexLoRA().initial_state(model)
    low = torch.randn(out, 2, generator=g) @ torch.randn(2, inn, generator=g)  # rank 2 < 4
    full = torch.randn(out, inn, generator=g)
    flex_state[f"{layers[0]}.delta_weight"] = low
    flex_state[f"{layers[1]}.delta_weight"] = full
    FlexLoRA.client_part({}, {"lora_seed": 5}).load_global(model, flex_state)
    loaded = model.adapter_state()
    s = model.scaling
    assert rel(s * loaded[b_n] @ loaded[a_n], low) < 1e-4
    assert loaded[a_n][2:].abs().sum() > 0 and not loaded[b_n][:, 2:].any()
    u, sv, vh = torch.linalg.svd(full)
    b2, a2 = f"{layers[1]}.lora_B.weight", f"{layers[1]}.lora_A.weight"
    assert rel(s * loaded[b2] @ loaded[a2], (u[:, :4] * sv[:4]) @ vh[:4]) < 1e-4
    assert not loaded[f"{layers[2]}.lora_B.weight"].any()  # zero global: plain fresh init

    # FFA: A frozen in prepare, update omits A
    ffa_part = FFA.client_part({}, {})
    ffa_part.prepare(model, None, [])
    assert not model.parameter(a_n).requires_grad and model.parameter(b_n).requires_grad
    sent = ffa_part.update(model, model.adapter_state())
    assert sent and not any(".lora_A" in n for n in sent)
    model.set_trainable(model.adapter_names)


def test_one_client_round_trip_keeps_the_trained_function(model):
    """Load, train, aggregate one full-rank client, downlink, reload: same logits (all methods)."""
    batch = model.tokenizer(["hello world", "federated lora"], return_tensors="pt", padding=True)

    def logits():
        model.model.eval()
        with torch.no_grad():
            return model.model(**batch).logits

    g = torch.Generator().manual_seed(13)
    for name in ("fedit", "ffa", "flora", "hetlora", "flexlora"):
        model.reset_base()
        cls = resolve(name)
        agg = cls(seed=1)
        state = agg.initial_state(model)
        held: dict[str, torch.Tensor] = {}
        for rnd in (1, 2):
            wire = agg.pack_downlink({n: state[n] - held.get(n, 0) for n in state},
                                     latest_round=rnd > 1)
            agg.downlink_spec(model).check_all(wire)
            part = cls.client_part(agg.options, agg.instructions(rnd, [5])[5])
            sent = part.unpack_downlink(wire)
            held = {n: held.get(n, 0) + sent.get(n, 0) for n in set(held) | set(sent)}
            part.load_global(model, held)
            part.prepare(model, None, [])
            start = model.adapter_state()
            with torch.no_grad():  # stands in for local training
                for n in model.adapter_names:
                    if model.parameter(n).requires_grad:
                        model.parameter(n).add_(0.05 * torch.randn(model.parameter(n).shape,
                                                                   generator=g))
            trained = logits()
            update = part.update(model, start)
            agg.uplink_spec(model).check_all(update)
            delta = run_round(agg, state, [ClientUpdate(5, update, 10, model.spec.rank,
                                                        model.spec.alpha)], rnd)
            state = {n: state[n] + delta.get(n, 0) for n in set(state) | set(delta)}
            wire = agg.pack_downlink({n: state[n] - held[n] for n in state}, latest_round=True)
            if name == "flora":
                assert any(n.endswith(".stack_A") for n in wire)
            sent = part.unpack_downlink(wire)
            reloaded = {n: held[n] + sent.get(n, 0) for n in held}
            cls.client_part(agg.options, agg.instructions(rnd + 1, [5])[5]).load_global(
                model, reloaded)
            assert torch.allclose(logits(), trained, atol=1e-5), (name, rnd)
    model.reset_base()
    model.set_trainable(model.adapter_names)
