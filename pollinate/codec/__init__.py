"""Pollinate's wire format: compress, frame and validate adapter deltas.

``encode(Delta, CodecSpec) -> bytes`` and ``decode(bytes, AdapterSpec) -> Delta``; the
schema is ``protos/pollinate/v1/delta.proto``. :class:`ErrorFeedback` carries what lossy
encodings drop into the next round. Every problem with a payload is a :class:`CodecError`.
"""

from pollinate.codec.delta import Delta, DeltaHeader, decode, encode
from pollinate.codec.encodings import ENCODINGS, CodecSpec, encoded_error_bound
from pollinate.codec.errors import (
    BadDtype,
    BadMagic,
    ChecksumMismatch,
    CodecError,
    IndexOutOfBounds,
    MalformedPayload,
    NonFiniteValues,
    PayloadTooLarge,
    ShapeMismatch,
    SizeMismatch,
    UnknownTensor,
    UnsupportedVersion,
)
from pollinate.codec.feedback import ErrorFeedback, encode_with_feedback

__all__ = [
    "ENCODINGS",
    "BadDtype",
    "BadMagic",
    "ChecksumMismatch",
    "CodecError",
    "CodecSpec",
    "Delta",
    "DeltaHeader",
    "ErrorFeedback",
    "IndexOutOfBounds",
    "MalformedPayload",
    "NonFiniteValues",
    "PayloadTooLarge",
    "ShapeMismatch",
    "SizeMismatch",
    "UnknownTensor",
    "UnsupportedVersion",
    "decode",
    "encode",
    "encode_with_feedback",
    "encoded_error_bound",
]
