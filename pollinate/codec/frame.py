"""The envelope around a serialized ``AdapterDelta``: prefix, zstd frame, checksums.

``b"PLN1" + zstd frame``. The prefix lets a receiver reject foreign bytes (and tell a
newer frame version, ``PLN2``..., from garbage) before spending any work; the zstd frame
must declare its content size and carry zstd's content checksum, so that
:func:`unwrap` can refuse a decompression bomb from the frame header alone and detect
corruption of the compressed bytes. Each tensor entry has its own CRC-32
(:func:`entry_checksum`) over its packed fields.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import zstandard

from pollinate.codec.errors import (
    BadMagic,
    ChecksumMismatch,
    MalformedPayload,
    PayloadTooLarge,
    UnsupportedVersion,
)
from pollinate.protos.pollinate.v1 import delta_pb2 as pb

PREFIX = b"PLN1"
_PREFIX_FAMILY = PREFIX[:3]
MAGIC = int.from_bytes(b"PLAD", "little")  # AdapterDelta.magic
CODEC_VERSION = 1
DEFAULT_MAX_PAYLOAD_BYTES = 64 * 2**20


def wrap(message: bytes, level: int) -> bytes:
    """Compress a serialized message into a payload."""
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True,
                                          write_content_size=True)
    return PREFIX + compressor.compress(message)


def unwrap(payload: bytes, max_bytes: int) -> bytes:
    """The serialized message inside ``payload``; both sizes are capped at ``max_bytes``."""
    if len(payload) > max_bytes:
        raise PayloadTooLarge(f"payload is {len(payload)} bytes, limit is {max_bytes}")
    prefix = bytes(payload[:len(PREFIX)])
    if prefix != PREFIX:
        if len(prefix) == len(PREFIX) and prefix.startswith(_PREFIX_FAMILY):
            raise UnsupportedVersion(f"frame version {prefix!r} is not supported (want {PREFIX!r})")
        raise BadMagic(f"payload starts with {prefix!r}, not {PREFIX!r}")
    frame = payload[len(PREFIX):]
    try:
        size = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as e:
        raise MalformedPayload(f"bad zstd frame header: {e}") from e
    if size < 0:
        raise MalformedPayload("zstd frame does not declare its content size")
    if size > max_bytes:
        raise PayloadTooLarge(f"payload decompresses to {size} bytes, limit is {max_bytes}")
    # libzstd stops with an error as soon as output exceeds the declared content size,
    # so memory stays bounded by max_bytes plus one block.
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    try:
        message = decompressor.decompress(frame)
    except zstandard.ZstdError as e:
        if "checksum" in str(e):
            raise ChecksumMismatch(f"zstd content checksum does not match: {e}") from e
        raise MalformedPayload(f"corrupt zstd frame: {e}") from e
    if not decompressor.eof:
        raise MalformedPayload("zstd frame is truncated")
    if decompressor.unused_data:
        raise MalformedPayload(f"{len(decompressor.unused_data)} bytes follow the zstd frame")
    if len(message) != size:
        raise MalformedPayload(f"zstd frame declares {size} bytes but holds {len(message)}")
    return message


def entry_checksum(entry: pb.TensorEntry) -> int:
    """CRC-32 over every field of ``entry`` except ``crc32`` itself."""
    crc = zlib.crc32(entry.name.encode())
    crc = zlib.crc32(np.array(list(entry.shape), dtype="<u8").tobytes(), crc)
    crc = zlib.crc32(struct.pack("<3i2Q", entry.dtype, entry.encoding, entry.index_coding,
                                 entry.numel, entry.nnz), crc)
    crc = zlib.crc32(entry.indices, crc)
    crc = zlib.crc32(entry.values, crc)
    return zlib.crc32(np.array(list(entry.scales), dtype="<f4").tobytes(), crc)
