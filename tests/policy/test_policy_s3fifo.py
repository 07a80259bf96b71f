"""S3-FIFO on sequences computed by hand from the SOSP '23 algorithm and its reference code."""

from __future__ import annotations

import pytest

from kvtier.errors import ConfigError, EvictionError
from kvtier.policy import S3FIFOPolicy


def queues(p: S3FIFOPolicy[str]) -> tuple[str, str, str]:
    s = p.snapshot()
    return "".join(s["small"]), "".join(s["main"]), "".join(s["ghost"])


def test_sizes_follow_the_ten_percent_split() -> None:
    p: S3FIFOPolicy[str] = S3FIFOPolicy(100)
    assert (p.small_target, p.main_target, p.ghost_capacity) == (10, 90, 90)
    tiny: S3FIFOPolicy[str] = S3FIFOPolicy(1)
    assert (tiny.small_target, tiny.main_target, tiny.ghost_capacity) == (1, 0, 0)


def test_one_hit_wonders_leave_through_the_ghost_and_come_back_into_main() -> None:
    p: S3FIFOPolicy[str] = S3FIFOPolicy(10)  # S 1, M 9, G 9
    for k in "abcdefghij":
        p.insert(k)
    assert p.evict() == ["a"]  # tail of S, never accessed -> ghost
    assert queues(p) == ("bcdefghij", "", "a")
    p.insert("a")  # ghost hit: admitted straight into M
    assert queues(p) == ("bcdefghij", "a", "")
    p.check_integrity()


def test_small_tail_needs_two_hits_to_be_promoted() -> None:
    p: S3FIFOPolicy[str] = S3FIFOPolicy(10)
    for k in "abcd":
        p.insert(k)
    p.access("a")
    p.access("a")  # freq 2 >= threshold: promoted
    p.access("b")  # freq 1: not enough
    assert p.evict() == ["b"]
    assert queues(p) == ("cd", "a", "b")
    assert p.snapshot()["freq"]["a"] == 0  # cleared on the move to M
    p.check_integrity()


def test_main_reinserts_with_decremented_frequency() -> None:
    p: S3FIFOPolicy[str] = S3FIFOPolicy(4, small_ratio=0.5)  # S 2, M 2, G 2
    for k in "abcd":
        p.insert(k)
    for k in "aabb":
        p.access(k)
    assert p.evict() == ["c"]  # a, b promoted on the way; c evicted into G
    assert queues(p) == ("d", "ab", "c")
    p.insert("c")  # ghost hit -> M, which is now over its target of 2
    assert queues(p) == ("d", "abc", "")
    for _ in range(5):
        p.access("a")  # capped at 3
    assert p.snapshot()["freq"]["a"] == 3
    assert p.evict() == ["b"]  # a reinserted with freq 2; b has freq 0
    assert queues(p) == ("d", "ca", "")
    assert p.snapshot()["freq"]["a"] == 2
    assert p.evict(2) == ["d", "c"]  # M back at target: S first, then M's tail c (freq 0)
    p.check_integrity()


def test_ghost_is_a_bounded_fifo() -> None:
    p: S3FIFOPolicy[str] = S3FIFOPolicy(4, small_ratio=0.5)  # ghost holds 2
    for k in "abcd":
        p.insert(k)
    assert p.evict(3) == ["a", "b", "c"]
    assert queues(p) == ("d", "", "bc")
    p.insert("a")  # a fell out of the ghost: back into S
    assert queues(p) == ("da", "", "bc")
    p.check_integrity()


def test_pinned_keys_are_never_chosen_and_evict_is_atomic() -> None:
    p: S3FIFOPolicy[str] = S3FIFOPolicy(10)
    for k in "abc":
        p.insert(k)
    p.pin("a")
    p.pin("b")
    assert p.evictable() == 1
    before = p.snapshot()
    with pytest.raises(EvictionError):
        p.evict(2)
    assert p.snapshot() == before
    assert p.evict() == ["c"]
    p.unpin("a")  # back at the head of S
    p.insert("d")
    assert queues(p) == ("ad", "", "c")
    p.remove("b")  # pinned keys may be removed; no ghost entry
    assert "b" not in p and queues(p)[2] == "c"
    p.check_integrity()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"small_ratio": 0.0}, "small_ratio"), ({"move_to_main_threshold": 4}, "move_to_main")],
)
def test_bad_parameters_are_config_errors(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        S3FIFOPolicy(10, **kwargs)  # type: ignore[arg-type]
