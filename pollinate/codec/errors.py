"""Errors raised while encoding or decoding adapter deltas.

Every payload comes from a peer we do not trust, so :func:`pollinate.codec.decode` turns
every way a payload can be wrong into one of these classes (never an ``IndexError`` or a
torch ``RuntimeError``). Callers that only want to reject bad payloads catch
:class:`CodecError`; tests and logs use the subclass to tell what was wrong.
"""

from __future__ import annotations


class CodecError(ValueError):
    """Base class: the delta or payload cannot be encoded or decoded."""


class BadMagic(CodecError):
    """The payload does not start with the Pollinate prefix or is not an adapter delta."""


class UnsupportedVersion(CodecError):
    """The payload was written by a frame or codec version this build cannot read."""


class PayloadTooLarge(CodecError):
    """The payload (compressed or decompressed) exceeds ``max_payload_bytes``."""


class MalformedPayload(CodecError):
    """The bytes are not a well-formed delta (bad zstd frame, protobuf, or field layout)."""


class SizeMismatch(CodecError):
    """A declared size (numel, nnz, scale count) disagrees with the packed data."""


class ShapeMismatch(CodecError):
    """A tensor's shape is not one the adapter spec (or the residual) allows."""


class UnknownTensor(CodecError):
    """A tensor name is not in the adapter spec."""


class IndexOutOfBounds(CodecError):
    """A sparse index is outside the tensor or indices are not strictly increasing."""


class BadDtype(CodecError):
    """A dtype, encoding or index-coding value is unknown, or a tensor is not floating point."""


class NonFiniteValues(CodecError):
    """A tensor, scale or decoded value is NaN or infinite."""


class ChecksumMismatch(CodecError):
    """The data does not match its checksum (zstd content checksum or a tensor's CRC-32)."""
