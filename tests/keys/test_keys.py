import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvtier.errors import BlobError, ConfigError
from kvtier.geometry import KVGeometry
from kvtier.keys import HEADER_SIZE, Namespace, key_from_engine_hash, pack, page_keys, verify

G = KVGeometry(2, 2, 32, 4, "bfloat16")


def ns(**kw: object) -> Namespace:
    return Namespace("model-a", G, **kw)  # type: ignore[arg-type]


def test_keys_are_128_bits_and_chained() -> None:
    keys = page_keys(ns(), list(range(10)))
    assert len(keys) == 2  # the trailing partial page gets no key
    assert all(len(k) == 16 for k in keys)
    # a continuation from the first page's key gives the same second key
    assert page_keys(ns(), list(range(4, 8)), parent=keys[0]) == keys[1:]
    # changing an early token changes every later key (the prefix is in the chain)
    other = page_keys(ns(), [99, *range(1, 10)])
    assert other[0] != keys[0] and other[1] != keys[1]


def test_keys_stable_across_processes_and_hash_seeds() -> None:
    code = (
        "from kvtier.keys import Namespace, page_keys;"
        "from kvtier.geometry import KVGeometry;"
        "print(page_keys(Namespace('model-a', KVGeometry(2, 2, 32, 4, 'bfloat16')),"
        " list(range(8)))[1].hex())"
    )
    outs = set()
    for seed in ("0", "1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        outs.add(out.stdout.strip())
    assert outs == {page_keys(ns(), list(range(8)))[1].hex()}


@pytest.mark.parametrize(
    "change",
    [
        {"model_id": "model-b"},
        {"tp_rank": 1, "tp_size": 2},
        {"tenant": "acme"},
        {"geometry": KVGeometry(2, 2, 32, 4, "float16")},
    ],
)
def test_namespace_separates_keys(change: dict[str, object]) -> None:
    base = {"model_id": "model-a", "geometry": G}
    other = Namespace(**{**base, **change})  # type: ignore[arg-type]
    assert other.fingerprint != ns().fingerprint
    assert page_keys(other, list(range(4))) != page_keys(ns(), list(range(4)))
    assert key_from_engine_hash(other, b"h") != key_from_engine_hash(ns(), b"h")


def test_namespace_bad_fields() -> None:
    with pytest.raises(ConfigError, match="tp_rank"):
        Namespace("m", G, tp_rank=2, tp_size=2)
    with pytest.raises(ConfigError, match="model_id"):
        Namespace("", G)


@given(st.binary(min_size=0, max_size=512))
def test_blob_round_trip(payload: bytes) -> None:
    n, key = ns(), b"k" * 16
    blob = pack(n.fingerprint, key, payload)
    assert bytes(verify(blob, n.fingerprint, key, len(payload))) == payload


def test_blob_rejects_corruption() -> None:
    n, key = ns(), b"k" * 16
    payload = bytes(range(256)) * 4
    blob = bytearray(pack(n.fingerprint, key, payload))
    with pytest.raises(BlobError, match="foreign"):
        verify(blob, Namespace("other", G).fingerprint, key, len(payload))
    with pytest.raises(BlobError, match="another page key"):
        verify(blob, n.fingerprint, b"x" * 16, len(payload))
    with pytest.raises(BlobError, match="truncated"):
        verify(blob[:-1], n.fingerprint, key, len(payload))
    with pytest.raises(BlobError, match="length"):
        verify(blob, n.fingerprint, key, len(payload) + 1)
    flipped = bytearray(blob)
    flipped[HEADER_SIZE + 100] ^= 0x10
    with pytest.raises(BlobError, match="checksum"):
        verify(flipped, n.fingerprint, key, len(payload))
    bad_magic = bytearray(blob)
    bad_magic[0:4] = b"XXXX"
    with pytest.raises(BlobError, match="magic"):
        verify(bad_magic, n.fingerprint, key, len(payload))
