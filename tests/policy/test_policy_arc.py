"""ARC on sequences computed by hand from Megiddo & Modha's algorithm."""

from __future__ import annotations

import pytest

from kvtier.errors import EvictionError
from kvtier.policy import ARCPolicy


def lists(p: ARCPolicy[str]) -> tuple[str, str, str, str]:
    s = p.snapshot()
    return tuple("".join(s[n]) for n in ("t1", "t2", "b1", "b2"))  # type: ignore[return-value]


def test_p_adapts_on_ghost_hits_and_ghosts_stay_bounded() -> None:
    p: ARCPolicy[str] = ARCPolicy(4)
    for k in "abcd":
        p.insert(k)
    p.access("a")
    assert lists(p) == ("bcd", "a", "", "")
    assert p.evict() == ["b"]  # |T1| = 3 > p = 0: LRU of T1 goes to B1
    p.insert("e")
    assert p.evict() == ["c"]
    assert lists(p) == ("de", "a", "bc", "")
    p.insert("b")  # hit in B1: p += max(1, |B2|/|B1|) = 1, b enters T2
    assert p.p == 1.0
    assert lists(p) == ("de", "ab", "c", "")
    assert p.evict() == ["d"]  # |T1| = 2 > p = 1
    p.insert("f")
    assert p.evict() == ["e"]
    assert lists(p) == ("f", "ab", "cde", "")
    p.insert("g")  # |T1| + |B1| would be 5 > c: the LRU ghost c is dropped
    assert lists(p) == ("fg", "ab", "de", "")
    p.access("f")
    assert p.evict() == ["a"]  # |T1| = 1 <= p = 1: LRU of T2 goes to B2
    assert lists(p) == ("g", "bf", "de", "a")
    p.insert("a")  # hit in B2: p -= max(1, |B1|/|B2|) = 2, clamped at 0
    assert p.p == 0.0
    assert lists(p) == ("g", "bfa", "de", "")
    p.check_integrity()


def test_p_grows_by_ratio_and_is_capped_at_capacity() -> None:
    p: ARCPolicy[str] = ARCPolicy(2)
    p.insert("a")
    p.insert("b")
    p.access("a")
    p.access("b")  # T2 = a b
    assert p.evict() == ["a"]  # T1 empty: T2 LRU
    p.insert("c")
    assert p.evict() == ["c"]  # |T1| = 1 > p = 0
    assert lists(p) == ("", "b", "c", "a")
    p.insert("c")  # hit in B1 with |B2| = |B1| = 1: p = 1
    assert p.p == 1.0
    assert p.evict() == ["b"]  # |T1| = 0: T2 LRU b -> B2
    assert lists(p) == ("", "c", "", "ab")
    p.insert("d")
    assert p.evict() == ["c"]  # |T1| = 1 is not > p = 1: T2's LRU goes
    assert lists(p) == ("d", "", "", "abc")
    p.insert("e")  # |T1|+|T2|+|B1|+|B2| would be 5 > 2c: the LRU of B2 is dropped
    assert lists(p) == ("de", "", "", "bc")
    assert p.evict() == ["d"]
    p.insert("d")  # hit in B1 with |B2|/|B1| = 2: p = min(c, 1 + 2) = 2
    assert p.p == 2.0
    assert lists(p) == ("e", "d", "", "bc")
    p.check_integrity()


def test_replace_falls_back_to_t2_when_t1_is_all_pinned() -> None:
    p: ARCPolicy[str] = ARCPolicy(3)
    for k in "abc":
        p.insert(k)
    p.access("c")  # T1 = a b, T2 = c
    p.pin("a")
    p.pin("b")
    assert p.evictable() == 1
    assert p.evict() == ["c"]
    assert lists(p) == ("", "", "", "c")
    with pytest.raises(EvictionError):
        p.evict()
    p.unpin("a")
    assert p.evict() == ["a"]
    p.check_integrity()


def test_access_on_pinned_key_moves_it_to_t2() -> None:
    p: ARCPolicy[str] = ARCPolicy(2)
    p.insert("a")
    p.pin("a")
    p.access("a")
    assert p.snapshot()["where"] == {"a": 2}
    p.unpin("a")
    assert lists(p) == ("", "a", "", "")
    p.check_integrity()


def test_remove_leaves_no_ghost() -> None:
    p: ARCPolicy[str] = ARCPolicy(2)
    p.insert("a")
    p.remove("a")
    assert lists(p) == ("", "", "", "")
    p.insert("a")  # a plain miss again: T1, p unchanged
    assert lists(p) == ("a", "", "", "") and p.p == 0.0


def test_ghost_bounds_hold_after_inserts_past_capacity() -> None:
    p: ARCPolicy[str] = ARCPolicy(1)
    p.insert("a")
    p.insert("b")  # past capacity: tolerated
    assert p.evict() == ["a"]  # |T1| + |B1| would be 2 > c: the ghost is dropped again
    assert lists(p) == ("b", "", "", "")
    p.check_integrity()
