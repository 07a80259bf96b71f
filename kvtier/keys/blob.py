"""Page blobs: the one on-wire / on-disk format below the GPU.

    offset  size  field
    0       4     magic b"KVTB"
    4       2     format version
    6       2     flags (bit 0: sealed, i.e. checksum valid)
    8       16    namespace fingerprint
    24      16    page key
    40      8     payload length (bytes)
    48      8     payload checksum (xxh3-64; 0 while unsealed)
    56      8     reserved (zero)
    64      ...   payload: the page in the canonical page-first layout

A host slot holds header + payload; lower tiers store the sealed slot bytes under the page key
as opaque bytes. The checksum is computed when a page leaves host memory (seal) rather than on
every GPU->host store, so the hot path pays nothing for it.
"""

from __future__ import annotations

import struct

import xxhash

from kvtier.errors import BlobError

MAGIC = b"KVTB"
VERSION = 1
HEADER_SIZE = 64
FLAG_SEALED = 1
_HEADER = struct.Struct("<4sHH16s16sQQ8x")
assert _HEADER.size == HEADER_SIZE


def checksum(payload: memoryview | bytes) -> int:
    return xxhash.xxh3_64_intdigest(payload)


def write_header(
    buf: memoryview, fingerprint: bytes, key: bytes, payload_len: int, *, seal: bool
) -> None:
    """Write the header into the first HEADER_SIZE bytes of `buf` (a slot). With `seal`, the
    checksum is computed over buf[HEADER_SIZE:HEADER_SIZE + payload_len]."""
    digest = 0
    if seal:
        digest = checksum(buf[HEADER_SIZE : HEADER_SIZE + payload_len])
    flags = FLAG_SEALED if seal else 0
    _HEADER.pack_into(buf, 0, MAGIC, VERSION, flags, fingerprint, key, payload_len, digest)


def pack(fingerprint: bytes, key: bytes, payload: bytes | memoryview) -> bytes:
    """A sealed blob as one bytes object (for tests and small tools; the hot path writes slots)."""
    out = bytearray(HEADER_SIZE + len(payload))
    out[HEADER_SIZE:] = payload
    write_header(memoryview(out), fingerprint, key, len(payload), seal=True)
    return bytes(out)


def verify(
    blob: memoryview | bytes, fingerprint: bytes, key: bytes, payload_len: int
) -> memoryview:
    """Check a sealed blob against the expected namespace, key and length; return its payload.

    Raises BlobError naming what is wrong; the caller counts it as a miss and drops the blob.
    """
    view = memoryview(blob)
    if len(view) < HEADER_SIZE:
        raise BlobError(f"blob truncated: {len(view)} bytes, header needs {HEADER_SIZE}")
    magic, version, flags, fp, k, length, digest = _HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise BlobError(f"bad magic {magic!r}")
    if version != VERSION:
        raise BlobError(f"unsupported blob version {version} (this kvtier reads {VERSION})")
    if fp != fingerprint:
        raise BlobError("foreign namespace fingerprint")
    if k != key:
        raise BlobError("blob holds another page key")
    if length != payload_len:
        raise BlobError(f"payload length {length}, expected {payload_len}")
    if len(view) < HEADER_SIZE + length:
        raise BlobError(f"blob truncated: {len(view) - HEADER_SIZE} of {length} payload bytes")
    if not flags & FLAG_SEALED:
        raise BlobError("blob was never sealed")
    payload = view[HEADER_SIZE : HEADER_SIZE + length]
    if checksum(payload) != digest:
        raise BlobError("checksum mismatch")
    return payload


def blob_size(payload_len: int) -> int:
    return HEADER_SIZE + payload_len
