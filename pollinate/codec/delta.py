"""Encode adapter deltas to payloads and decode payloads, validating everything.

:func:`encode` turns named float tensors into one compressed payload according to a
:class:`~pollinate.codec.encodings.CodecSpec`. :func:`decode` treats the payload as
hostile: it caps sizes before and while decompressing, checks the header, checks every
entry against the receiver's :class:`~pollinate.spec.AdapterSpec` and its own declared
sizes and checksum, and only then allocates and fills tensors. Every failure is a
:class:`~pollinate.codec.errors.CodecError` subclass naming the tensor or field.

A tensor that top-k leaves empty (possible with global scope) is still sent as an entry
with ``nnz = 0``, so the decoded delta always has the same names as the encoded one and
a receiver can tell "all zeros" from "not sent".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
from google.protobuf.message import DecodeError

from pollinate.codec import encodings, frame, indices, topk
from pollinate.codec.encodings import ENCODING_IDS, SPARSE_IDS, CodecSpec
from pollinate.codec.errors import (
    BadDtype,
    BadMagic,
    ChecksumMismatch,
    CodecError,
    MalformedPayload,
    NonFiniteValues,
    PayloadTooLarge,
    ShapeMismatch,
    SizeMismatch,
    UnknownTensor,
    UnsupportedVersion,
)
from pollinate.protos.pollinate.v1 import delta_pb2 as pb
from pollinate.spec import AdapterSpec, SpecError

_DTYPE_IDS: dict[torch.dtype, int] = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.float64: pb.DTYPE_FLOAT64,
}
_UINT64_MAX = 2**64 - 1
DEFAULT_MAX_DECODED_BYTES = 2**30


@dataclass(frozen=True)
class DeltaHeader:
    """Which run and round a delta belongs to, and which global versions it connects."""

    run_id: int = 0
    round: int = 0
    base_version: int = 0
    target_version: int = 0
    base_digest: bytes = b""


@dataclass
class Delta:
    """Named tensors plus header; after :func:`decode` all tensors are float32 on CPU."""

    header: DeltaHeader
    tensors: dict[str, torch.Tensor]


def encode(delta: Delta, spec: CodecSpec) -> bytes:
    """Serialize and compress ``delta`` as ``spec`` says.

    Raises :class:`BadDtype` for non-float tensors, :class:`NonFiniteValues` for NaN/Inf
    (or values that overflow fp16/bf16), :class:`PayloadTooLarge` when the message or the
    payload exceeds ``spec.max_payload_bytes``.
    """
    message = pb.AdapterDelta(magic=frame.MAGIC, codec_version=frame.CODEC_VERSION,
                              **_header_fields(delta.header))
    flat = {name: _to_flat(name, t) for name, t in delta.tensors.items()}
    encoding_of = {name: ENCODING_IDS[spec.encoding_of(name)] for name in flat}
    sparse = {name: x for name, x in flat.items() if encoding_of[name] in SPARSE_IDS}
    kept = topk.select(sparse, spec.density, spec.topk_scope) if sparse else {}
    for name, t in delta.tensors.items():
        encoding = encoding_of[name]
        entry = message.tensors.add(name=name, shape=tuple(t.shape), encoding=encoding,
                                    dtype=_DTYPE_IDS[t.dtype], numel=flat[name].size)
        if name in sparse:
            entry.index_coding, entry.indices = indices.encode_indices(kept[name], t.numel())
            entry.values, scales = encodings.pack_sparse(flat[name][kept[name]], encoding)
            entry.nnz = kept[name].size
        else:
            entry.values, scales = encodings.pack_dense(flat[name], encoding, tuple(t.shape),
                                                        name)
            entry.nnz = entry.numel
        entry.scales.extend(scales)
        entry.crc32 = frame.entry_checksum(entry)
    serialized = message.SerializeToString()
    if len(serialized) > spec.max_payload_bytes:
        raise PayloadTooLarge(f"delta serializes to {len(serialized)} bytes, "
                              f"limit is {spec.max_payload_bytes}")
    payload = frame.wrap(serialized, spec.zstd_level)
    if len(payload) > spec.max_payload_bytes:
        raise PayloadTooLarge(f"payload is {len(payload)} bytes, "
                              f"limit is {spec.max_payload_bytes}")
    return payload


def decode(payload: bytes, adapter: AdapterSpec, *,
           max_payload_bytes: int = frame.DEFAULT_MAX_PAYLOAD_BYTES,
           max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> Delta:
    """Validate and decode ``payload`` against ``adapter``; raise a :class:`CodecError`.

    ``max_payload_bytes`` caps both the compressed payload and the serialized message;
    ``max_decoded_bytes`` caps the float32 tensors it may make us allocate (a sparse
    payload of a few bytes can declare large all-zero tensors).
    """
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise MalformedPayload(f"payload must be bytes, not {type(payload).__name__}")
    try:
        message = pb.AdapterDelta.FromString(frame.unwrap(payload, max_payload_bytes))
    except DecodeError as e:
        raise MalformedPayload(f"payload is not an AdapterDelta message: {e}") from e
    if message.magic != frame.MAGIC:
        raise BadMagic(f"message magic is {message.magic:#010x}, not {frame.MAGIC:#010x}")
    if message.codec_version != frame.CODEC_VERSION:
        raise UnsupportedVersion(f"codec version {message.codec_version} is not supported "
                                 f"(this build reads {frame.CODEC_VERSION})")
    header = DeltaHeader(**{f.name: getattr(message, f.name) for f in fields(DeltaHeader)})
    tensors: dict[str, torch.Tensor] = {}
    budget = max_decoded_bytes
    for entry in message.tensors:
        if entry.name in tensors:
            raise MalformedPayload(f"tensor {entry.name!r} appears twice")
        shape = _check_entry(entry, adapter)
        budget -= 4 * entry.numel
        if budget < 0:
            raise PayloadTooLarge(f"tensor {entry.name!r}: decoded tensors exceed "
                                  f"{max_decoded_bytes} bytes")
        with np.errstate(all="ignore"):  # overflow to inf is reported as NonFiniteValues
            values = _decode_values(entry)
        tensors[entry.name] = torch.from_numpy(values.reshape(shape))
    return Delta(header, tensors)


def _header_fields(header: DeltaHeader) -> dict[str, int | bytes]:
    values = {f.name: getattr(header, f.name) for f in fields(DeltaHeader)}
    for name, value in values.items():
        if name == "base_digest":
            if not isinstance(value, bytes) or len(value) > 64:
                raise CodecError(f"header field base_digest must be at most 64 bytes, got {value!r}")
            continue
        if not isinstance(value, int) or not 0 <= value <= _UINT64_MAX:
            raise CodecError(f"header field {name}={value!r} is not an unsigned 64-bit int")
    return values


def _to_flat(name: str, t: torch.Tensor) -> np.ndarray:
    """Flat finite float32 numpy copy-or-view of ``t``."""
    if not isinstance(t, torch.Tensor) or t.dtype not in _DTYPE_IDS:
        raise BadDtype(f"tensor {name!r} must be a float16/bfloat16/float32/float64 tensor, "
                       f"got {getattr(t, 'dtype', type(t).__name__)}")
    x = t.detach().to("cpu", torch.float32).contiguous().reshape(-1).numpy()
    if not np.isfinite(x).all():
        raise NonFiniteValues(f"tensor {name!r} has NaN or Inf values (or overflows float32)")
    return x


def _check_entry(entry: pb.TensorEntry, adapter: AdapterSpec) -> tuple[int, ...]:
    """Everything about ``entry`` that can be checked before decoding; returns its shape."""
    name = entry.name
    if entry.dtype not in _DTYPE_IDS.values():
        raise BadDtype(f"tensor {name!r}: unknown dtype value {entry.dtype}")
    if entry.encoding not in ENCODING_IDS.values():
        raise BadDtype(f"tensor {name!r}: unknown encoding value {entry.encoding}")
    if entry.index_coding not in pb.IndexCoding.values():
        raise BadDtype(f"tensor {name!r}: unknown index coding value {entry.index_coding}")
    if name not in adapter:
        raise UnknownTensor(f"tensor {name!r} is not in the adapter spec")
    shape = tuple(entry.shape)
    try:
        adapter.check(name, shape)
    except SpecError as e:
        raise ShapeMismatch(str(e)) from e
    if entry.numel != math.prod(shape):
        raise SizeMismatch(f"tensor {name!r}: numel is {entry.numel}, shape {shape} "
                           f"has {math.prod(shape)}")
    if entry.crc32 != frame.entry_checksum(entry):
        raise ChecksumMismatch(f"tensor {name!r}: CRC-32 does not match its fields")
    sparse = entry.encoding in SPARSE_IDS
    if sparse and entry.index_coding == pb.INDEX_CODING_DENSE:
        raise MalformedPayload(f"tensor {name!r}: sparse encoding without index coding")
    if not sparse and (entry.index_coding != pb.INDEX_CODING_DENSE or entry.indices):
        raise MalformedPayload(f"tensor {name!r}: dense encoding with indices")
    if (entry.nnz > entry.numel) if sparse else (entry.nnz != entry.numel):
        raise SizeMismatch(f"tensor {name!r}: nnz {entry.nnz} does not fit numel {entry.numel}")
    want = encodings.scale_count(entry.encoding, shape)
    if len(entry.scales) != want:
        raise SizeMismatch(f"tensor {name!r}: {len(entry.scales)} scales, expected {want}")
    want = encodings.value_bytes(entry.encoding, entry.nnz)
    if len(entry.values) != want:
        raise SizeMismatch(f"tensor {name!r}: {len(entry.values)} value bytes, expected {want}")
    return shape


def _decode_values(entry: pb.TensorEntry) -> np.ndarray:
    """Flat float32 array of a checked entry; checks indices, scales and finiteness."""
    name = entry.name
    scales = np.array(list(entry.scales), dtype=np.float32)
    if not np.isfinite(scales).all():
        raise NonFiniteValues(f"tensor {name!r}: a scale is NaN or Inf")
    if (scales < 0).any():
        raise MalformedPayload(f"tensor {name!r}: a scale is negative")
    if not encodings.padding_ok(entry.encoding, entry.values, entry.nnz):
        raise MalformedPayload(f"tensor {name!r}: packed codes have non-zero padding")
    if entry.encoding in SPARSE_IDS:
        where = indices.decode_indices(entry.index_coding, entry.indices, entry.nnz,
                                       entry.numel, name)
        x = np.zeros(entry.numel, dtype=np.float32)
        x[where] = encodings.unpack_sparse(entry.values, scales[0], entry.encoding, entry.nnz)
    else:
        x = encodings.unpack_dense(entry.values, scales, entry.encoding, tuple(entry.shape))
    if not np.isfinite(x).all():
        raise NonFiniteValues(f"tensor {name!r}: decoded values contain NaN or Inf")
    return x
