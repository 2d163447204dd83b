"""How tensor values are packed: the encodings, their options and their error bounds.

Dense encodings carry every element (fp32 bit-exact, fp16/bf16 rounded to nearest even,
int8 with an absmax scale per tensor or per row). Sparse ``topk-*`` encodings carry only
the kept elements chosen by :mod:`pollinate.codec.topk`: ternary (sign bits and one
scale, ComPEFT style) or int8. Everything works on flat little-endian numpy arrays; the
decoders assume their input sizes were already checked by :mod:`pollinate.codec.delta`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import zstandard

from pollinate.codec.errors import NonFiniteValues
from pollinate.codec.frame import DEFAULT_MAX_PAYLOAD_BYTES
from pollinate.protos.pollinate.v1 import delta_pb2 as pb

ENCODINGS: tuple[str, ...] = (
    "fp32", "fp16", "bf16", "int8", "int8-row", "topk-ternary", "topk-int8",
)
ENCODING_IDS: dict[str, int] = {
    "fp32": pb.ENCODING_FP32,
    "fp16": pb.ENCODING_FP16,
    "bf16": pb.ENCODING_BF16,
    "int8": pb.ENCODING_INT8,
    "int8-row": pb.ENCODING_INT8_ROW,
    "topk-ternary": pb.ENCODING_TOPK_TERNARY,
    "topk-int8": pb.ENCODING_TOPK_INT8,
}
SPARSE_IDS = frozenset({pb.ENCODING_TOPK_TERNARY, pb.ENCODING_TOPK_INT8})
TOPK_SCOPES = ("global", "tensor")

# Largest float32 scale whose product with +-127 is still finite in float32 (the largest
# float32 below max/127): tensors near float32's limit must not decode to inf.
_MAX_SCALE = np.nextafter(np.float32(np.finfo(np.float32).max / 127), np.float32(0))


@dataclass(frozen=True)
class CodecSpec:
    """How a sender encodes deltas. The receiver needs none of it: payloads self-describe.

    ``density`` is the fraction of elements top-k keeps, over all tensors together
    (``topk_scope="global"``: one magnitude threshold, so tensors with larger updates
    keep more) or per tensor (``"tensor"``: k = max(1, round(density * numel))).
    """

    encoding: str = "topk-ternary"
    density: float = 0.1
    topk_scope: str = "global"
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    zstd_level: int = 3

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding {self.encoding!r} is not one of {ENCODINGS}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.topk_scope not in TOPK_SCOPES:
            raise ValueError(f"topk_scope {self.topk_scope!r} is not one of {TOPK_SCOPES}")
        if self.max_payload_bytes <= 0:
            raise ValueError(f"max_payload_bytes must be positive, got {self.max_payload_bytes}")
        if not 1 <= self.zstd_level <= zstandard.MAX_COMPRESSION_LEVEL:
            raise ValueError(f"zstd_level must be in [1, {zstandard.MAX_COMPRESSION_LEVEL}], "
                             f"got {self.zstd_level}")

    @property
    def lossless(self) -> bool:
        """True when decoding returns the encoded float32 values bit for bit."""
        return self.encoding == "fp32"

    @property
    def sparse(self) -> bool:
        return ENCODING_IDS[self.encoding] in SPARSE_IDS


def scale_count(encoding: int, shape: tuple[int, ...]) -> int:
    """Number of scales an entry with this encoding and shape carries."""
    if encoding == pb.ENCODING_INT8_ROW and len(shape) == 2:
        return shape[0]
    if encoding in (pb.ENCODING_INT8, pb.ENCODING_INT8_ROW) or encoding in SPARSE_IDS:
        return 1
    return 0


def value_bytes(encoding: int, count: int) -> int:
    """Length of ``values`` for ``count`` carried elements."""
    if encoding == pb.ENCODING_FP32:
        return 4 * count
    if encoding in (pb.ENCODING_FP16, pb.ENCODING_BF16):
        return 2 * count
    if encoding == pb.ENCODING_TOPK_TERNARY:
        return (count + 7) // 8
    return count


def _absmax_scales(groups: np.ndarray) -> np.ndarray:
    """Per-row absmax/127 rounded *up* to float32, so that 127 * scale >= absmax.

    Rounding to nearest could round down (badly so for subnormal tensors, or to 0), and
    the largest elements would then clip to +-127 with more than half a step of error.
    Only at float32's limit is the scale capped (error there stays far below a step).
    """
    exact = np.abs(groups).max(axis=1, initial=0.0).astype(np.float64) / 127.0
    scales = exact.astype(np.float32)
    scales = np.where(scales < exact, np.nextafter(scales, np.float32(np.inf)), scales)
    return np.minimum(scales, _MAX_SCALE)


def _quantize_int8(groups: np.ndarray) -> tuple[bytes, list[float]]:
    """int8 codes of a (rows, cols) array with one absmax scale per row."""
    scales = _absmax_scales(groups)
    wide = scales.astype(np.float64)
    inverse = np.divide(1.0, wide, out=np.zeros_like(wide), where=wide > 0)[:, None]
    ratio = groups * inverse
    codes = np.clip(np.rint(ratio, out=ratio), -127, 127, out=ratio).astype(np.int8)
    return codes.tobytes(), scales.tolist()


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even); returns the 16-bit patterns."""
    bits = x.view(np.uint32)
    bias = ((bits >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
    return ((bits + bias) >> np.uint32(16)).astype("<u2")


def pack_dense(x: np.ndarray, encoding: int, shape: tuple[int, ...], name: str
               ) -> tuple[bytes, list[float]]:
    """``values`` and ``scales`` for the flat float32 ``x`` (finite) of a tensor."""
    if encoding == pb.ENCODING_FP32:
        return x.astype("<f4").tobytes(), []
    if encoding == pb.ENCODING_FP16:
        with np.errstate(over="ignore"):  # overflow becomes inf, reported just below
            half = x.astype("<f2")
        if not np.isfinite(half).all():
            raise NonFiniteValues(f"tensor {name!r} overflows float16 (|x| > 65504)")
        return half.tobytes(), []
    if encoding == pb.ENCODING_BF16:
        bits = _bf16_bits(x)
        if ((bits & 0x7F80) == 0x7F80).any():
            raise NonFiniteValues(f"tensor {name!r} overflows bfloat16")
        return bits.tobytes(), []
    rows = shape[0] if encoding == pb.ENCODING_INT8_ROW and len(shape) == 2 else 1
    cols = x.size // rows if rows else 0
    return _quantize_int8(x.reshape(rows, cols))


def unpack_dense(values: bytes, scales: np.ndarray, encoding: int) -> np.ndarray:
    """Flat float32 elements of a dense entry (sizes already checked)."""
    if encoding == pb.ENCODING_FP32:
        return np.frombuffer(values, dtype="<f4").astype(np.float32)
    if encoding == pb.ENCODING_FP16:
        return np.frombuffer(values, dtype="<f2").astype(np.float32)
    if encoding == pb.ENCODING_BF16:
        wide = np.frombuffer(values, dtype="<u2").astype(np.uint32) << np.uint32(16)
        return wide.view(np.float32)
    codes = np.frombuffer(values, dtype=np.int8).astype(np.float32)
    rows = scales.size
    cols = codes.size // rows if rows else 0
    return (codes.reshape(rows, cols) * scales[:, None]).reshape(-1)


def pack_sparse(kept: np.ndarray, encoding: int) -> tuple[bytes, list[float]]:
    """``values`` and the single scale for the kept (non-zero, finite) elements."""
    if encoding == pb.ENCODING_TOPK_TERNARY:
        scale = np.float32(np.abs(kept).astype(np.float64).mean()) if kept.size else 0.0
        return np.packbits(kept < 0).tobytes(), [float(scale)]
    return _quantize_int8(kept.reshape(1, -1))


def unpack_sparse(values: bytes, scale: np.float32, encoding: int, nnz: int) -> np.ndarray:
    """float32 values of the ``nnz`` kept elements (sizes and padding already checked)."""
    if encoding == pb.ENCODING_TOPK_TERNARY:
        negative = np.unpackbits(np.frombuffer(values, dtype=np.uint8), count=nnz)
        return np.where(negative.astype(bool), -scale, scale).astype(np.float32)
    return np.frombuffer(values, dtype=np.int8).astype(np.float32) * scale


def ternary_padding_ok(values: bytes, nnz: int) -> bool:
    """True when the unused low bits of the last sign byte are zero (canonical form)."""
    spare = 8 * len(values) - nnz
    return spare == 0 or values[-1] & ((1 << spare) - 1) == 0


def encoded_error_bound(tensor: torch.Tensor, encoding: str) -> float:
    """Largest absolute per-element error a dense ``encoding`` can make on ``tensor``.

    Used by tests and by aggregators that want to budget for quantisation noise. Top-k
    encodings drop elements, so their error is not bounded by the tensor alone.
    """
    if encoding not in ENCODINGS or ENCODING_IDS[encoding] in SPARSE_IDS:
        raise ValueError(f"no per-element error bound for encoding {encoding!r}")
    x = tensor.detach().to("cpu", torch.float32).reshape(-1).numpy()
    absmax = float(np.abs(x).max(initial=0.0))
    if encoding == "fp32":
        return 0.0
    if encoding == "fp16":
        return absmax * 2.0**-11 + 2.0**-25
    if encoding == "bf16":
        return absmax * 2.0**-8 + 2.0**-134
    shape = tuple(tensor.shape)
    rows = shape[0] if encoding == "int8-row" and len(shape) == 2 else 1
    scales = _absmax_scales(x.reshape(rows, x.size // rows if rows else 0))
    # Half a quantisation step, plus float32 rounding of code * scale.
    return float(scales.max(initial=0.0)) / 2 + absmax * 2.0**-23
