"""Round trips through encode/decode: exactness, error bounds, top-k, error feedback."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pollinate.codec import (
    ENCODINGS,
    BadDtype,
    CodecSpec,
    Delta,
    DeltaHeader,
    ErrorFeedback,
    MalformedPayload,
    NonFiniteValues,
    PayloadTooLarge,
    ShapeMismatch,
    decode,
    encode,
    encode_with_feedback,
    encoded_error_bound,
    frame,
    topk,
)
from pollinate.codec.indices import decode_indices, encode_indices
from pollinate.protos.pollinate.v1 import delta_pb2 as pb
from pollinate.spec import AdapterSpec

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

shapes = st.lists(st.integers(0, 7), min_size=0, max_size=3).map(tuple)


F32_MAX = float(np.finfo(np.float32).max)


def tensor_dicts(limit: float = F32_MAX, min_tensors: int = 1):
    """1-4 named float32 tensors (empty and 0-d included), |x| <= ``limit``."""
    limit = float(np.float32(limit))
    elements = st.one_of(
        st.floats(-limit, limit, width=32),
        st.floats(-2.0**-10, 2.0**-10, width=32),  # small values and subnormals
        st.sampled_from([0.0, -0.0, 1.0, -1.0]),
    )
    one = shapes.flatmap(lambda s: arrays(np.float32, s, elements=elements))
    return st.lists(one, min_size=min_tensors, max_size=4).map(
        lambda xs: {f"t{i}": torch.from_numpy(x.copy()) for i, x in enumerate(xs)})


def roundtrip(tensors: dict[str, torch.Tensor], spec: CodecSpec,
              header: DeltaHeader = DeltaHeader()) -> Delta:
    out = decode(encode(Delta(header, tensors), spec), AdapterSpec.of(tensors))
    assert out.header == header
    assert list(out.tensors) == list(tensors)
    for name, t in out.tensors.items():
        assert t.dtype == torch.float32 and t.device.type == "cpu"
        assert t.shape == tensors[name].shape
    return out


@SETTINGS
@given(tensor_dicts(), st.tuples(*[st.integers(0, 2**64 - 1)] * 4))
def test_fp32_is_bit_exact(tensors, header_fields):
    out = roundtrip(tensors, CodecSpec("fp32"), DeltaHeader(*header_fields))
    for name, t in tensors.items():
        assert torch.equal(out.tensors[name].view(torch.int32), t.view(torch.int32))


@SETTINGS
@given(tensor_dicts(limit=65504.0))
def test_fp16_matches_the_cast(tensors):
    out = roundtrip(tensors, CodecSpec("fp16"))
    for name, t in tensors.items():
        assert torch.equal(out.tensors[name], t.half().float())
        err = (out.tensors[name] - t).abs().max().item() if t.numel() else 0.0
        assert err <= encoded_error_bound(t, "fp16")


@SETTINGS
@given(tensor_dicts(limit=3e38))
def test_bf16_matches_the_cast(tensors):
    out = roundtrip(tensors, CodecSpec("bf16"))
    for name, t in tensors.items():
        assert torch.equal(out.tensors[name], t.bfloat16().float())
        err = (out.tensors[name].double() - t.double()).abs().max().item() if t.numel() else 0.0
        assert err <= encoded_error_bound(t, "bf16")


def _row_scales(t: torch.Tensor, per_row: bool, top: float = 127.0) -> np.ndarray:
    x = t.double().numpy()
    rows = x.reshape(t.shape[0], -1) if per_row and t.dim() == 2 and t.shape[0] else x.reshape(1, -1)
    return np.abs(rows).max(axis=1, initial=0.0) / top


@SETTINGS
@given(tensor_dicts(), st.sampled_from(["int8", "int8-row", "int4-row"]))
def test_integer_codes_are_within_half_a_step(tensors, encoding):
    out = roundtrip(tensors, CodecSpec(encoding))
    for name, t in tensors.items():
        if not t.numel():
            continue
        scales = _row_scales(t, encoding.endswith("-row"), 7.0 if encoding == "int4-row" else 127.0)
        rows = scales.size
        err = (out.tensors[name].double() - t.double()).abs().numpy().reshape(rows, -1)
        tiny = float(np.finfo(np.float32).smallest_subnormal)
        slack = np.abs(t.double().numpy()).max() * 2.0**-22 + tiny
        assert (err <= scales[:, None] / 2 + slack).all()
        assert err.max() <= encoded_error_bound(t, encoding)


def _check_topk(tensors, spec: CodecSpec, out: Delta) -> None:
    flat = {n: t.reshape(-1).numpy() for n, t in tensors.items()}
    kept = topk.select(flat, spec.density, spec.topk_scope)
    groups = [[n] for n in flat] if spec.topk_scope == "tensor" else [list(flat)]
    for names in groups:
        x = np.concatenate([flat[n] for n in names])
        mask = np.concatenate([np.isin(np.arange(flat[n].size), kept[n]) for n in names])
        k = max(1, round(spec.density * x.size)) if x.size else 0
        assert mask.sum() == min(k, np.count_nonzero(x))
        if mask.any() and not mask.all():
            assert np.abs(x[mask]).min() >= np.abs(x[~mask]).max()
    for name in tensors:
        x, got = flat[name], out.tensors[name].reshape(-1).numpy()
        dropped = np.ones(x.size, dtype=bool)
        dropped[kept[name]] = False
        assert (got[dropped] == 0).all()
        xk, gk = x[kept[name]], got[kept[name]]
        if spec.encoding == "topk-ternary":
            scale = np.float32(np.abs(xk.astype(np.float64)).mean()) if xk.size else 0
            assert np.array_equal(gk, np.sign(xk) * scale)
        elif xk.size:
            step = np.abs(xk.astype(np.float64)).max() / 127
            slack = np.abs(xk).max() * 2.0**-22 + float(np.finfo(np.float32).smallest_subnormal)
            assert (np.abs(gk.astype(np.float64) - xk) <= step / 2 + slack).all()


@SETTINGS
@given(tensor_dicts(), st.sampled_from(["topk-ternary", "topk-int8"]),
       st.sampled_from([0.01, 0.1, 0.5, 1.0]), st.sampled_from(["global", "tensor"]))
def test_topk_keeps_the_largest_and_zeroes_the_rest(tensors, encoding, density, scope):
    spec = CodecSpec(encoding, density=density, topk_scope=scope)
    _check_topk(tensors, spec, roundtrip(tensors, spec))


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (0, 5), (1,), (2, 3, 4)])
def test_empty_and_scalar_tensors_roundtrip(encoding, shape):
    t = torch.arange(1, 1 + int(np.prod(shape)), dtype=torch.float32).reshape(shape) / 7
    out = roundtrip({"x": t, "zero": torch.zeros(shape)}, CodecSpec(encoding, density=1.0))
    assert torch.equal(out.tensors["zero"], torch.zeros(shape))
    tol = 0.0 if encoding.startswith("topk") or encoding == "fp32" else encoded_error_bound(t, encoding)
    if encoding == "topk-ternary":  # all kept, every value becomes +-mean|x|
        tol = (t - t.abs().mean()).abs().max().item() if t.numel() else 0.0
    elif encoding == "topk-int8":
        tol = t.abs().max().item() / 254 * 1.001 if t.numel() else 0.0
    assert (out.tensors["x"] - t).abs().max().item() <= tol if t.numel() else True


def test_global_topk_sends_tensors_left_empty_as_zeros():
    tensors = {"big": torch.randn(40, 10) * 100, "small": torch.randn(3, 5) * 1e-6}
    out = roundtrip(tensors, CodecSpec("topk-ternary", density=0.05))
    assert torch.equal(out.tensors["small"], torch.zeros(3, 5))
    assert torch.count_nonzero(out.tensors["big"]) == round(0.05 * (400 + 15))


@pytest.mark.parametrize("density,coding", [(0.01, pb.INDEX_CODING_DELTA_VARINT),
                                            (0.9, pb.INDEX_CODING_BITMAP)])
def test_index_coding_picks_the_smaller(density, coding):
    payload = encode(Delta(DeltaHeader(), {"w": torch.randn(100, 100)}),
                     CodecSpec("topk-int8", density=density))
    entry = pb.AdapterDelta.FromString(frame.unwrap(payload, 2**30)).tensors[0]
    assert entry.index_coding == coding
    assert entry.nnz == round(density * 10_000)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 2**62).flatmap(
    lambda numel: st.tuples(st.just(numel), st.sets(st.integers(0, min(numel, 2**62) - 1),
                                                    max_size=64))))
def test_index_coding_roundtrips_any_index_set(case):
    numel, index_set = case
    idx = np.array(sorted(index_set), dtype=np.int64)
    if numel > 1 << 20 and idx.size * 9 > (numel + 7) // 8:
        return  # would pick a bitmap of gigabytes; covered for small numel below
    coding, data = encode_indices(idx, numel)
    assert np.array_equal(decode_indices(coding, data, idx.size, numel, "w"), idx)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1)))))
def test_index_coding_roundtrips_dense_sets(case):
    numel, index_set = case
    idx = np.array(sorted(index_set), dtype=np.int64)
    coding, data = encode_indices(idx, numel)
    assert len(data) <= (numel + 7) // 8
    assert np.array_equal(decode_indices(coding, data, idx.size, numel, "w"), idx)


def _run_rounds(feedback: ErrorFeedback | None, g: torch.Tensor, rounds: int):
    spec = CodecSpec("topk-ternary", density=0.05)
    adapter = AdapterSpec.of({"w": g})
    cum_true, cum_sent, residual_norms = torch.zeros_like(g), torch.zeros_like(g), []
    for _ in range(rounds):
        _, decoded = encode_with_feedback({"w": g}, feedback, lambda t: encode(Delta(DeltaHeader(), t), spec),
                                          lambda data: decode(data, adapter).tensors, need_decoded=True)
        if feedback:
            residual_norms.append(feedback.residual["w"].norm().item())
        cum_true += g
        cum_sent += decoded["w"]
    return (cum_true - cum_sent).norm().item() / cum_true.norm().item(), residual_norms


def test_error_feedback_tracks_the_cumulative_sum():
    g = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    ef = ErrorFeedback()
    rel_ef, norms = _run_rounds(ef, g, 120)
    rel_plain, _ = _run_rounds(None, g, 120)
    # The residual (what the receiver is still missing) saturates at ~1/density rounds'
    # worth of update instead of growing with the number of rounds.
    assert max(norms) < g.norm().item() / 0.05
    assert max(norms[60:]) <= 1.15 * max(norms[:60])
    assert rel_ef < 0.1 < rel_plain
    assert rel_ef < rel_plain / 5


def test_encode_with_feedback_keeps_the_residual_and_decodes_only_when_needed():
    update = {"w": torch.randn(16, 8, generator=torch.Generator().manual_seed(1))}
    spec = CodecSpec("topk-ternary", density=0.25)
    decoded_payloads: list[bytes] = []

    def encode_update(tensors):
        return encode(Delta(DeltaHeader(), tensors), spec)

    def decode_payload(data: bytes):
        decoded_payloads.append(data)
        return decode(data, AdapterSpec.of(update)).tensors

    payload, decoded = encode_with_feedback(update, None, encode_update, decode_payload)
    assert payload == encode_update(update) and decoded is None and not decoded_payloads
    feedback = ErrorFeedback()
    payload, decoded = encode_with_feedback(update, feedback, encode_update, decode_payload)
    assert decoded_payloads == [payload] and payload == encode_update(update)  # empty residual: same bytes
    assert torch.equal(feedback.residual["w"], update["w"] - decoded["w"])
    assert feedback.residual["w"].abs().sum() > 0  # top-k at 25% dropped something
    second, _ = encode_with_feedback(update, feedback, encode_update, decode_payload)
    assert second != payload  # the residual is sent in the next round


def test_error_feedback_state_roundtrips_and_validates():
    ef = ErrorFeedback({"a": torch.randn(3, 4), "b": torch.zeros(0)})
    back = ErrorFeedback.from_bytes(ef.to_bytes())
    assert back.residual.keys() == ef.residual.keys()
    assert all(torch.equal(back.residual[n], ef.residual[n]) for n in ef.residual)
    assert ErrorFeedback.from_bytes(ErrorFeedback().to_bytes()).residual == {}
    with pytest.raises(MalformedPayload):
        ErrorFeedback.from_bytes(b"\x00\x01garbage")
    with pytest.raises(ShapeMismatch):
        ef.compensate({"a": torch.zeros(4, 3)})
    comp = ef.compensate({"a": torch.ones(3, 4), "c": torch.ones(2)})
    assert torch.equal(comp["a"], torch.ones(3, 4) + ef.residual["a"])
    ef.update({"c": torch.ones(2)}, {})
    assert torch.equal(ef.residual["c"], torch.ones(2))


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_encode_refuses_non_finite(encoding):
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.ones(4, 4)
        t[1, 2] = bad
        with pytest.raises(NonFiniteValues, match="'w'"):
            encode(Delta(DeltaHeader(), {"ok": torch.ones(2), "w": t}), CodecSpec(encoding))


def test_encode_refuses_overflow_and_non_float():
    with pytest.raises(NonFiniteValues, match="float16"):
        encode(Delta(DeltaHeader(), {"w": torch.full((2,), 1e5)}), CodecSpec("fp16"))
    with pytest.raises(NonFiniteValues):
        encode(Delta(DeltaHeader(), {"w": torch.full((2,), 1e300, dtype=torch.float64)}),
               CodecSpec("fp32"))
    with pytest.raises(BadDtype, match="'w'"):
        encode(Delta(DeltaHeader(), {"w": torch.ones(2, dtype=torch.int64)}), CodecSpec("fp32"))
    with pytest.raises(PayloadTooLarge):
        encode(Delta(DeltaHeader(), {"w": torch.randn(1000)}),
               CodecSpec("fp32", max_payload_bytes=1000))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_decode_to_float32(dtype):
    t = torch.randn(5, 3).to(dtype)
    out = roundtrip({"w": t}, CodecSpec("fp32"))
    assert torch.equal(out.tensors["w"], t.float())


def test_codec_spec_validates():
    assert CodecSpec("fp32").lossless and not CodecSpec().lossless
    for bad in ({"encoding": "gzip"}, {"density": 0.0}, {"density": 1.5},
                {"topk_scope": "layer"}, {"max_payload_bytes": 0}, {"zstd_level": 0}):
        with pytest.raises(ValueError):
            CodecSpec(**bad)


def test_a_million_floats_encode_and_decode_fast():
    x = {"w": torch.randn(1000, 1000)}
    adapter = AdapterSpec.of(x)
    for encoding in ("topk-ternary", "int8-row", "fp16"):
        spec = CodecSpec(encoding)
        decode(encode(Delta(DeltaHeader(), x), spec), adapter)  # warm up
        start = time.process_time()  # CPU time: robust to other jobs sharing the cores
        decode(encode(Delta(DeltaHeader(), x), spec), adapter)
        # ~15-40 ms on one core; the bound only catches per-element Python loops.
        assert time.process_time() - start < 0.5, encoding


def test_sign_keeps_each_rank_components_projection_on_itself():
    """``sign``: one bit per element, one scale per slice along the shorter side (rows of a
    LoRA A or a head, columns of a LoRA B), and that scale is sum x^2 / sum |x|, so each decoded
    slice has the same inner product with the slice as the slice with itself (no shrinkage:
    the mean-|x| scale kept about 2/pi of it on Gaussian updates)."""
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(4, 64, generator=gen) * torch.tensor([[1.0], [0.1], [0.01], [10.0]])
    b = torch.randn(64, 4, generator=gen) * torch.tensor([[2.0, 0.2, 0.02, 20.0]])
    out = roundtrip({"a": a, "b": b}, CodecSpec("sign")).tensors
    a64, b64 = a.double(), b.double()
    assert torch.allclose(out["a"], torch.sign(a) * ((a64**2).sum(1, keepdim=True) / a64.abs().sum(1, keepdim=True)).float())
    assert torch.allclose(out["b"], torch.sign(b) * ((b64**2).sum(0, keepdim=True) / b64.abs().sum(0, keepdim=True)).float())
    assert torch.allclose((out["a"] * a).sum(1), (a * a).sum(1), rtol=1e-5)
    assert torch.allclose((out["b"] * b).sum(0), (b * b).sum(0), rtol=1e-5)
    assert ((out["a"] * a).sum(1) / (torch.sign(a) * a.abs().mean(1, keepdim=True) * a).sum(1) > 1.2).all()
    # 1 bit per element and 4 bytes per scale, before the frame's few dozen bytes
    assert len(encode(Delta(DeltaHeader(), {"a": a, "b": b}), CodecSpec("sign"))) < 2 * 256 // 8 + 8 * 4 + 120


def parse_entries(payload: bytes) -> dict[str, pb.TensorEntry]:
    return {e.name: e for e in pb.AdapterDelta.FromString(frame.unwrap(payload, 2**30)).tensors}


def test_int4_packs_two_codes_per_byte():
    t = torch.tensor([[7.0, -7.0, 3.0], [3.5, -1.0, 0.0]])
    out = roundtrip({"t": t}, CodecSpec("int4-row")).tensors["t"]
    assert torch.equal(out, t)  # every value is a code times its row's scale (1 and 0.5)
    payload = parse_entries(encode(Delta(DeltaHeader(), {"t": t}), CodecSpec("int4-row")))
    assert len(payload["t"].values) == 3 and list(payload["t"].scales) == [1.0, 0.5]


def test_head_tensors_take_their_own_dense_encoding_and_no_top_k_share():
    """``head_encoding``: the head's tensors go dense (int8 per row) while top-k picks its share
    among the LoRA tensors only, so a large head update cannot crowd the factors out."""
    gen = torch.Generator().manual_seed(5)
    tensors = {"layer.lora_A": torch.randn(4, 50, generator=gen),
               "layer.lora_B": torch.randn(50, 4, generator=gen),
               "classifier.weight": 100 * torch.randn(6, 50, generator=gen),
               "classifier.bias": torch.randn(6, generator=gen)}
    spec = CodecSpec("topk-int8", density=0.1, head_encoding="int8-row", head_modules=("classifier",))
    entries = parse_entries(encode(Delta(DeltaHeader(), tensors), spec))
    assert {n: e.encoding for n, e in entries.items()} == {
        "layer.lora_A": pb.ENCODING_TOPK_INT8, "layer.lora_B": pb.ENCODING_TOPK_INT8,
        "classifier.weight": pb.ENCODING_INT8_ROW, "classifier.bias": pb.ENCODING_INT8_ROW}
    assert entries["layer.lora_A"].nnz + entries["layer.lora_B"].nnz == 40  # 10% of the 400 LoRA entries
    out = roundtrip(tensors, spec).tensors
    for name in ("classifier.weight", "classifier.bias"):
        bound = encoded_error_bound(tensors[name], "int8-row")
        assert (out[name] - tensors[name]).abs().max() <= bound
    assert not spec.lossless
    assert CodecSpec("fp32", head_encoding="fp32", head_modules=("classifier",)).lossless
    with pytest.raises(ValueError, match="dense"):
        CodecSpec("topk-int8", head_encoding="topk-ternary")


def test_sign2_sends_two_magnitudes_per_slice():
    """``sign2``: per slice (as ``sign``), elements above the slice's mean |x| decode to the mean
    |x| of those elements, the others to the mean of the rest, each with its sign; 2 bits each."""
    a = torch.tensor([[4.0, -2.0, 1.0, -1.0, 0.0], [0.5, 0.5, -0.5, 0.5, -8.0]])
    out = roundtrip({"a": a}, CodecSpec("sign2")).tensors["a"]
    # row 0: mean |x| 1.6, large {4, 2} -> 3, small {1, 1, 0} -> 2/3; row 1: mean 2, large {8}, small 0.5
    expected = torch.tensor([[3.0, -3.0, 2 / 3, -2 / 3, 2 / 3], [0.5, 0.5, -0.5, 0.5, -8.0]])
    assert torch.allclose(out, expected)
    assert len(parse_entries(encode(Delta(DeltaHeader(), {"a": a}), CodecSpec("sign2")))["a"].values) == 3
