"""Hostile payloads: decode must reject them with the right CodecError, never crash.

Random corruption (flips, truncation, extension, garbage, fuzzed messages) must raise a
CodecError subclass; targeted tampering must raise the specific subclass. Tampered
entries are re-signed (CRC-32 recomputed) when the check under test sits behind the
checksum.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pollinate.codec import (
    ENCODINGS,
    BadDtype,
    BadMagic,
    ChecksumMismatch,
    CodecError,
    CodecSpec,
    Delta,
    DeltaHeader,
    IndexOutOfBounds,
    MalformedPayload,
    NonFiniteValues,
    PayloadTooLarge,
    ShapeMismatch,
    SizeMismatch,
    UnknownTensor,
    UnsupportedVersion,
    decode,
    encode,
    frame,
)
from pollinate.codec.encodings import scale_count
from pollinate.codec.indices import encode_indices
from pollinate.protos.pollinate.v1 import delta_pb2 as pb
from pollinate.spec import AdapterSpec, TensorSpec

TENSORS = {
    "layer.0.lora_A": torch.randn(4, 16, generator=torch.Generator().manual_seed(1)),
    "layer.0.lora_B": torch.randn(16, 4, generator=torch.Generator().manual_seed(2)),
    "head": torch.randn(3, generator=torch.Generator().manual_seed(3)),
    "scalar": torch.tensor(0.5),
}
ADAPTER = AdapterSpec.of(TENSORS, free_rank=True, max_free_dim=32)
SPECS = [CodecSpec(e) for e in ENCODINGS] + [
    CodecSpec("topk-int8", density=0.9, topk_scope="tensor"),  # bitmap indices
    CodecSpec("topk-ternary", density=0.1, topk_scope="tensor"),  # varint indices
]
PAYLOADS = [encode(Delta(DeltaHeader(7, 3, 2, 3), TENSORS), s) for s in SPECS]


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def parse(payload: bytes) -> pb.AdapterDelta:
    return pb.AdapterDelta.FromString(frame.unwrap(payload, 2**30))


def rewrap(message: pb.AdapterDelta, resign: bool = True) -> bytes:
    if resign:
        for entry in message.tensors:
            entry.crc32 = frame.entry_checksum(entry)
    return frame.wrap(message.SerializeToString(), 3)


def entry_of(message: pb.AdapterDelta, name: str) -> pb.TensorEntry:
    return next(e for e in message.tensors if e.name == name)


def test_valid_payloads_decode():
    for payload in PAYLOADS:
        out = decode(payload, ADAPTER)
        assert out.header == DeltaHeader(7, 3, 2, 3)
        assert list(out.tensors) == list(TENSORS)


# -- random corruption: any CodecError, nothing else -------------------------------------

payloads = st.sampled_from(PAYLOADS)


@fuzz(300)
@given(payloads, st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)),
                          min_size=1, max_size=8))
def test_byte_flips_are_rejected(payload, flips):
    data = bytearray(payload)
    for pos, mask in flips:
        data[pos % len(data)] ^= mask
    assume(bytes(data) != payload)
    try:
        out = decode(bytes(data), ADAPTER)
    except CodecError:
        return
    # Only a flip the format ignores may pass (zstd's "unused" frame-header bit): the
    # result must then be exactly the original.
    original = decode(payload, ADAPTER)
    assert out.header == original.header
    assert all(torch.equal(out.tensors[n], t) for n, t in original.tensors.items())


@fuzz(150)
@given(payloads, st.data())
def test_truncation_is_rejected(payload, data):
    cut = data.draw(st.integers(0, len(payload) - 1))
    expected = BadMagic if cut < len(frame.PREFIX) else MalformedPayload
    with pytest.raises(expected):
        decode(payload[:cut], ADAPTER)


@fuzz(100)
@given(payloads, st.binary(min_size=1, max_size=64))
def test_extension_is_rejected(payload, tail):
    with pytest.raises(MalformedPayload, match="follow the zstd frame"):
        decode(payload + tail, ADAPTER)


@fuzz(150)
@given(st.binary(max_size=512))
def test_garbage_is_rejected(garbage):
    with pytest.raises(CodecError):
        decode(garbage, ADAPTER)


@fuzz(150)
@given(st.binary(max_size=512), st.booleans())
def test_garbage_inside_a_valid_frame_is_rejected(garbage, compressed):
    # Either raw garbage after the prefix, or garbage as a well-formed zstd frame (so it
    # reaches the protobuf parser and the header checks).
    body = frame.wrap(garbage, 1) if compressed else frame.PREFIX + garbage
    with pytest.raises(CodecError):
        decode(body, ADAPTER)


def _often(draw, likely, other, percent: int = 85):
    """Draw from ``likely`` ``percent``% of the time, else from ``other``."""
    return draw(likely if draw(st.integers(0, 99)) < percent else other)


def _plausible_layout(draw, entry: pb.TensorEntry) -> None:
    """Make sizes, indices and scales agree with the shape so fuzzing gets past the size
    checks into index and value decoding (which then see random bits)."""
    numel = math.prod(entry.shape)
    count = scale_count(entry.encoding, tuple(entry.shape))
    if numel > 1024 or count > 1024:  # e.g. 8,193 rows of zero columns: scales Hypothesis cannot draw
        return
    entry.numel = numel
    sparse = entry.encoding in (pb.ENCODING_TOPK_TERNARY, pb.ENCODING_TOPK_INT8)
    if sparse:
        kept = np.array(sorted(draw(st.sets(st.integers(0, max(numel - 1, 0)), max_size=numel))),
                        dtype=np.int64)[:numel]
        entry.nnz = kept.size
        entry.index_coding, packed = encode_indices(kept, numel)
        if packed and draw(st.booleans()):  # break the indices but keep their length
            spot = draw(st.integers(0, len(packed) - 1))
            packed = packed[:spot] + bytes([draw(st.integers(0, 255))]) + packed[spot + 1:]
        entry.indices = packed
    else:
        entry.nnz, entry.index_coding, entry.indices = numel, pb.INDEX_CODING_DENSE, b""
    width = {pb.ENCODING_FP32: 4, pb.ENCODING_FP16: 2, pb.ENCODING_BF16: 2}
    size = ((entry.nnz + 7) // 8 if entry.encoding == pb.ENCODING_TOPK_TERNARY
            else entry.nnz * width.get(entry.encoding, 1))
    entry.values = draw(st.binary(min_size=size, max_size=size))
    scale = st.floats(0, 10, width=32) | st.floats(width=32)
    del entry.scales[:]
    entry.scales.extend(draw(st.lists(scale, min_size=count, max_size=count)))


@st.composite
def fuzzed_messages(draw) -> bytes:
    """AdapterDelta messages that are mostly right, so every check gets exercised."""
    message = pb.AdapterDelta(
        magic=_often(draw, st.just(frame.MAGIC), st.integers(0, 2**32 - 1), 95),
        codec_version=_often(draw, st.just(frame.CODEC_VERSION), st.integers(0, 9), 95),
        run_id=draw(st.integers(0, 2**64 - 1)),
    )
    any_int = st.integers(0, 20) | st.integers(0, 2**64 - 1)
    for _ in range(draw(st.integers(0, 4))):
        name = _often(draw, st.sampled_from(list(TENSORS)), st.text(max_size=8))
        spec_shape = st.tuples(*[st.integers(1, 40) if d is None else st.just(d)
                                 for d in ADAPTER[name].shape]) if name in ADAPTER else None
        random_shape = st.lists(any_int, max_size=3)
        entry = message.tensors.add(
            name=name,
            shape=(draw(random_shape) if spec_shape is None
                   else _often(draw, spec_shape, random_shape)),
            dtype=_often(draw, st.integers(1, 4), st.integers(-2, 8), 95),
            encoding=_often(draw, st.integers(1, 7), st.integers(-2, 12), 95),
            index_coding=_often(draw, st.integers(0, 2), st.integers(-2, 6), 95),
            indices=draw(st.binary(max_size=32)),
            values=draw(st.binary(max_size=64)),
            scales=draw(st.lists(st.floats(width=32), max_size=4)),
            numel=draw(any_int),
            nnz=draw(any_int),
        )
        if draw(st.integers(0, 99)) < 70:
            _plausible_layout(draw, entry)
        entry.crc32 = _often(draw, st.just(frame.entry_checksum(entry)),
                             st.integers(0, 2**32 - 1), 90)
    return frame.wrap(message.SerializeToString(), 1)


@fuzz(300)
@given(fuzzed_messages())
def test_fuzzed_messages_decode_or_raise_codec_errors(payload):
    try:
        out = decode(payload, ADAPTER)
    except CodecError:
        return
    for name, t in out.tensors.items():
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
        ADAPTER.check(name, tuple(t.shape))


@fuzz(100)
@given(st.sampled_from([e for e in ENCODINGS if not e.startswith("topk")]),
       st.integers(0, 200), st.integers(1, 255))
def test_dense_value_bytes_flipped_after_resign_decode_or_raise(encoding, pos, mask):
    message = parse(PAYLOADS[ENCODINGS.index(encoding)])
    entry = entry_of(message, "layer.0.lora_B")
    values = bytearray(entry.values)
    values[pos % len(values)] ^= mask
    entry.values = bytes(values)
    try:
        out = decode(rewrap(message), ADAPTER)
    except NonFiniteValues:
        return
    assert torch.isfinite(out.tensors["layer.0.lora_B"]).all()


# -- targeted: the right error class -----------------------------------------------------

def test_wrong_prefix_and_versions():
    payload = PAYLOADS[0]
    with pytest.raises(BadMagic):
        decode(b"XXXX" + payload[4:], ADAPTER)
    with pytest.raises(BadMagic):
        decode(b"", ADAPTER)
    with pytest.raises(UnsupportedVersion, match="PLN2"):
        decode(b"PLN2" + payload[4:], ADAPTER)
    message = parse(payload)
    message.magic = int.from_bytes(b"XXXX", "little")
    with pytest.raises(BadMagic, match="magic"):
        decode(rewrap(message), ADAPTER)
    message = parse(payload)
    message.codec_version = frame.CODEC_VERSION + 1
    with pytest.raises(UnsupportedVersion, match="codec version 2"):
        decode(rewrap(message), ADAPTER)
    with pytest.raises(MalformedPayload):
        decode("not bytes", ADAPTER)  # type: ignore[arg-type]


def test_zstd_checksum_and_entry_checksum():
    data = bytearray(PAYLOADS[0])
    data[-1] ^= 0x01  # the zstd content checksum itself
    with pytest.raises(ChecksumMismatch):
        decode(bytes(data), ADAPTER)
    message = parse(PAYLOADS[0])
    entry = entry_of(message, "head")
    entry.values = entry.values[:-4] + struct.pack("<f", 1.25)
    with pytest.raises(ChecksumMismatch, match="'head'"):
        decode(rewrap(message, resign=False), ADAPTER)


@pytest.mark.parametrize("tensors,error,match", [
    ({"layer.0.lora_A": torch.zeros(4, 17)}, ShapeMismatch, "layer.0.lora_A"),
    ({"layer.0.lora_A": torch.zeros(33, 16)}, ShapeMismatch, "layer.0.lora_A"),  # rank > max
    ({"layer.0.lora_B": torch.zeros(16, 4, 1)}, ShapeMismatch, "layer.0.lora_B"),
    ({"head": torch.zeros(())}, ShapeMismatch, "head"),
    ({"layer.1.lora_A": torch.zeros(4, 16)}, UnknownTensor, "layer.1.lora_A"),
])
@pytest.mark.parametrize("encoding", ["fp32", "topk-ternary"])
def test_tensors_not_in_the_spec(tensors, error, match, encoding):
    payload = encode(Delta(DeltaHeader(), tensors), CodecSpec(encoding))
    with pytest.raises(error, match=match):
        decode(payload, ADAPTER)


def test_free_rank_accepts_other_ranks():
    tensors = {"layer.0.lora_A": torch.randn(7, 16), "layer.0.lora_B": torch.randn(16, 2)}
    out = decode(encode(Delta(DeltaHeader(), tensors), CodecSpec("fp32")), ADAPTER)
    assert all(torch.equal(out.tensors[n], t) for n, t in tensors.items())


def test_size_caps():
    payload = PAYLOADS[0]
    with pytest.raises(PayloadTooLarge):
        decode(payload, ADAPTER, max_payload_bytes=len(payload) - 1)
    bomb = frame.wrap(b"\x00" * (8 << 20), 3)  # 8 MiB of zeros in a few hundred bytes
    assert len(bomb) < 4096
    with pytest.raises(PayloadTooLarge, match="decompresses"):
        decode(bomb, ADAPTER, max_payload_bytes=1 << 20)
    streamed = zstandard.ZstdCompressor().compressobj()
    no_size = frame.PREFIX + streamed.compress(b"\x00" * 100) + streamed.flush()
    with pytest.raises(MalformedPayload, match="content size"):
        decode(no_size, ADAPTER)
    # A tiny sparse payload can declare big all-zero tensors: cap what decode allocates.
    big = AdapterSpec({"w": TensorSpec((None, 1024))})
    sparse = encode(Delta(DeltaHeader(), {"w": torch.zeros(1024, 1024)}),
                    CodecSpec("topk-ternary"))
    assert len(sparse) < 200
    with pytest.raises(PayloadTooLarge, match="'w'"):
        decode(sparse, big, max_decoded_bytes=1 << 20)
    assert decode(sparse, big).tensors["w"].count_nonzero() == 0


def _tamper(spec_index: int, name: str, edit, resign: bool = True) -> bytes:
    message = parse(PAYLOADS[spec_index])
    edit(entry_of(message, name))
    return rewrap(message, resign)


(FP32, FP16, BF16, INT8, INT8_ROW, TERNARY, TOPK_INT8, SIGN, INT4_ROW, SIGN2,
 BITMAP, TENSOR_TERNARY) = range(12)


def _set(**fields):
    def edit(entry):
        for key, value in fields.items():
            if isinstance(value, list):
                del getattr(entry, key)[:]
                getattr(entry, key).extend(value)
            else:
                setattr(entry, key, value)
    return edit


def _bad_varint_gaps(entry):
    entry.indices = bytes([3, 0]) + entry.indices[2:]  # second gap 0: repeated index


def _varint_past_end(entry):
    entry.indices = entry.indices[:-1] + bytes([0x7F])  # last gap far past numel


def _overlong_varint(entry):
    entry.indices = b"\xff" * 9 + b"\x01" + entry.indices[1:]


def _truncated_varint(entry):
    entry.indices = entry.indices[:-1] + bytes([0x81])


def _bitmap_padding(entry):
    entry.indices = entry.indices[:-1] + bytes([entry.indices[-1] | 0x01])


def _ternary_padding(entry):
    entry.values = entry.values[:-1] + bytes([entry.values[-1] | 0x01])


def _int4_padding(entry):  # "head" has 3 elements: the last byte's high nibble is padding
    entry.values = entry.values[:-1] + bytes([entry.values[-1] | 0x10])


def _sign2_padding(entry):  # "head" has 3 elements: the last byte's top two bits are padding
    entry.values = entry.values[:-1] + bytes([entry.values[-1] | 0x40])


def _nan_value(entry):
    entry.values = struct.pack("<f", float("nan")) + entry.values[4:]


def _inf_fp16(entry):
    entry.values = np.float16(np.inf).tobytes() + entry.values[2:]


def _duplicate(message_payload: bytes) -> bytes:
    message = parse(message_payload)
    message.tensors.add().CopyFrom(message.tensors[0])
    return rewrap(message)


@pytest.mark.parametrize("payload,error,match", [
    (lambda: _tamper(FP32, "head", _set(numel=4)), SizeMismatch, "'head'.*numel"),
    (lambda: _tamper(FP32, "head", _set(nnz=2)), SizeMismatch, "'head'.*nnz"),
    (lambda: _tamper(FP32, "head", _set(values=b"\0" * 8)), SizeMismatch, "value bytes"),
    (lambda: _tamper(INT8, "head", _set(scales=[])), SizeMismatch, "'head'.*scales"),
    (lambda: _tamper(INT8_ROW, "layer.0.lora_B", _set(scales=[1.0])), SizeMismatch, "scales"),
    (lambda: _tamper(TENSOR_TERNARY, "layer.0.lora_A", _set(nnz=0)), SizeMismatch, "lora_A"),
    (lambda: _tamper(TENSOR_TERNARY, "layer.0.lora_A", _set(nnz=65)), SizeMismatch, "nnz"),
    (lambda: _tamper(TENSOR_TERNARY, "layer.0.lora_A", _bad_varint_gaps), IndexOutOfBounds,
     "strictly increasing"),
    (lambda: _tamper(TENSOR_TERNARY, "layer.0.lora_A", _varint_past_end), IndexOutOfBounds,
     "out of bounds"),
    (lambda: _tamper(TENSOR_TERNARY, "layer.0.lora_A", _overlong_varint), IndexOutOfBounds,
     "63 bits"),
    (lambda: _tamper(TENSOR_TERNARY, "layer.0.lora_A", _truncated_varint), MalformedPayload,
     "truncated"),
    (lambda: _tamper(BITMAP, "head", _bitmap_padding), IndexOutOfBounds, "past"),
    (lambda: _tamper(BITMAP, "head", _set(indices=b"")), SizeMismatch, "bitmap"),
    (lambda: _tamper(TENSOR_TERNARY, "layer.0.lora_A", _ternary_padding), MalformedPayload,
     "padding"),
    (lambda: _tamper(SIGN, "head", _ternary_padding), MalformedPayload, "padding"),
    (lambda: _tamper(INT4_ROW, "head", _int4_padding), MalformedPayload, "padding"),
    (lambda: _tamper(SIGN2, "head", _sign2_padding), MalformedPayload, "padding"),
    (lambda: _tamper(SIGN2, "layer.0.lora_B", _set(scales=[1.0] * 4)), SizeMismatch, "scales"),
    (lambda: _tamper(INT4_ROW, "layer.0.lora_A", _set(scales=[1.0])), SizeMismatch, "scales"),
    (lambda: _tamper(SIGN, "layer.0.lora_B", _set(scales=[1.0] * 16)), SizeMismatch, "scales"),
    (lambda: _tamper(SIGN, "layer.0.lora_A", _set(scales=[1.0, -1.0, 1.0, 1.0])), MalformedPayload,
     "negative"),
    (lambda: _tamper(FP32, "head", _set(dtype=0)), BadDtype, "'head'.*dtype"),
    (lambda: _tamper(FP32, "head", _set(encoding=99)), BadDtype, "encoding"),
    (lambda: _tamper(FP32, "head", _set(encoding=-1)), BadDtype, "encoding"),
    (lambda: _tamper(FP32, "head", _set(index_coding=7)), BadDtype, "index coding"),
    (lambda: _tamper(FP32, "head", _set(index_coding=pb.INDEX_CODING_BITMAP)),
     MalformedPayload, "dense encoding with indices"),
    (lambda: _tamper(TERNARY, "head", _set(index_coding=pb.INDEX_CODING_DENSE)),
     MalformedPayload, "without index"),
    (lambda: _tamper(FP32, "layer.0.lora_B", _nan_value), NonFiniteValues, "lora_B"),
    (lambda: _tamper(FP16, "layer.0.lora_B", _inf_fp16), NonFiniteValues, "lora_B"),
    (lambda: _tamper(INT8, "head", _set(scales=[float("inf")])), NonFiniteValues, "scale"),
    (lambda: _tamper(INT8, "head", _set(scales=[3e38])), NonFiniteValues, "decoded"),
    (lambda: _tamper(TOPK_INT8, "head", _set(scales=[float("nan")])), NonFiniteValues, "scale"),
    (lambda: _tamper(TERNARY, "layer.0.lora_A", _set(scales=[-1.0])), MalformedPayload,
     "negative"),
    (lambda: _tamper(FP32, "head", _set(shape=[4])), ShapeMismatch, "'head'"),
    (lambda: _tamper(FP32, "head", _set(name="nope")), UnknownTensor, "'nope'"),
    (lambda: _duplicate(PAYLOADS[FP32]), MalformedPayload, "twice"),
])
def test_targeted_tampering_raises_the_specific_error(payload, error, match):
    with pytest.raises(error, match=match):
        decode(payload(), ADAPTER)
