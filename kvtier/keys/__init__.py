"""Page keys (chained prefix hashes + namespace fingerprint) and page blobs."""

from kvtier.keys.blob import HEADER_SIZE, blob_size, checksum, pack, verify, write_header
from kvtier.keys.hashing import PageKey, key_from_engine_hash, key_hex, page_keys
from kvtier.keys.namespace import FINGERPRINT_BYTES, KEY_BYTES, Namespace

__all__ = [
    "FINGERPRINT_BYTES",
    "HEADER_SIZE",
    "KEY_BYTES",
    "Namespace",
    "PageKey",
    "blob_size",
    "checksum",
    "key_from_engine_hash",
    "key_hex",
    "pack",
    "page_keys",
    "verify",
    "write_header",
]
