"""LRU on hand-computed sequences."""

from __future__ import annotations

import pytest

from kvtier.errors import ConfigError, EvictionError
from kvtier.policy import LRUPolicy


def test_evicts_least_recent_first() -> None:
    p: LRUPolicy[str] = LRUPolicy(3)
    for k in "abc":
        p.insert(k)
    p.access("a")  # order now b, c, a
    assert p.evict(2) == ["b", "c"]
    assert list(p.keys()) == ["a"]
    p.check_integrity()


def test_duplicate_insert_and_missing_keys_raise() -> None:
    p: LRUPolicy[str] = LRUPolicy(2)
    p.insert("a")
    with pytest.raises(KeyError):
        p.insert("a")
    for op in (p.access, p.remove, p.pin, p.unpin):
        with pytest.raises(KeyError):
            op("zz")


def test_pinned_key_is_skipped_and_becomes_most_recent_on_unpin() -> None:
    p: LRUPolicy[str] = LRUPolicy(3)
    for k in "abc":
        p.insert(k)
    p.pin("a")
    p.pin("a")  # idempotent
    assert p.evictable() == 2
    assert len(p) == 3 and "a" in p
    assert p.evict(1) == ["b"]
    p.unpin("a")
    p.unpin("a")
    p.insert("d")  # order c, a, d
    assert p.evict(3) == ["c", "a", "d"]
    p.check_integrity()


def test_evict_is_atomic_when_too_few_are_unpinned() -> None:
    p: LRUPolicy[str] = LRUPolicy(3)
    for k in "abc":
        p.insert(k)
    p.pin("b")
    before = p.snapshot()
    with pytest.raises(EvictionError):
        p.evict(3)
    assert p.snapshot() == before
    assert p.evict(0) == []


def test_remove_pinned_drops_pin_and_leaves_no_trace() -> None:
    p: LRUPolicy[str] = LRUPolicy(2)
    p.insert("a")
    p.pin("a")
    p.remove("a")
    assert "a" not in p and len(p) == 0 and p.evictable() == 0
    p.insert("a")  # a fresh, unpinned key again
    assert p.evict(1) == ["a"]


@pytest.mark.parametrize("capacity", [0, -1, True, 2.5])
def test_bad_capacity_is_a_config_error(capacity: object) -> None:
    with pytest.raises(ConfigError, match="capacity"):
        LRUPolicy(capacity)  # type: ignore[arg-type]
