"""Page keys: chained prefix hashes over token pages.

key_i = BLAKE2b-128(key=fingerprint, data=key_{i-1} || tokens of page i as little-endian int64)

so a page's key names its whole prefix and its namespace. BLAKE2b (keyed) rather than a fast
non-cryptographic hash because keys cross tenants: nobody can craft a collision with another
tenant's pages without the fingerprint's inputs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from kvtier.keys.namespace import KEY_BYTES, Namespace

PageKey = bytes  # KEY_BYTES long

_ROOT = b"\x00" * KEY_BYTES


def page_keys(
    namespace: Namespace,
    tokens: Sequence[int] | np.ndarray,
    *,
    page_size: int | None = None,
    parent: PageKey | None = None,
) -> list[PageKey]:
    """Keys of every *full* page of `tokens` (a trailing partial page gets no key).

    `parent` is the key of the page just before `tokens[0]` when hashing a continuation.
    """
    size = page_size or namespace.geometry.page_size
    arr = np.ascontiguousarray(np.asarray(tokens, dtype="<i8"))
    n_pages = arr.shape[0] // size
    data = arr[: n_pages * size].tobytes()
    step = size * 8
    prev = parent if parent is not None else _ROOT
    fp = namespace.fingerprint
    blake = hashlib.blake2b
    keys: list[PageKey] = []
    append = keys.append
    for i in range(n_pages):
        prev = blake(prev + data[i * step : (i + 1) * step], digest_size=KEY_BYTES, key=fp).digest()
        append(prev)
    return keys


def key_from_engine_hash(namespace: Namespace, engine_hash: bytes | int | str) -> PageKey:
    """Key for a page an engine already identifies by its own chained block hash (vLLM's block
    hashes, SGLang's page hashes). The engine hash chains the prefix; the fingerprint adds the
    namespace, so two models that happen to share engine hashes never share KV."""
    if isinstance(engine_hash, int):
        raw = engine_hash.to_bytes((engine_hash.bit_length() + 8) // 8, "little", signed=True)
    elif isinstance(engine_hash, str):
        raw = engine_hash.encode()
    else:
        raw = bytes(engine_hash)
    return hashlib.blake2b(raw, digest_size=KEY_BYTES, key=namespace.fingerprint).digest()


def key_hex(key: PageKey) -> str:
    return key.hex()
