"""Replaying a key trace through a policy, the way a cache tier of fixed size would use it."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from kvtier.policy.base import EvictionPolicy


@dataclass(frozen=True)
class ReplayResult:
    """Hit counts of one replay. ``hit_ratio`` is hits / accesses, 0.0 for an empty trace."""

    policy: str
    capacity: int
    accesses: int
    hits: int
    misses: int

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "policy": self.policy,
            "capacity": self.capacity,
            "accesses": self.accesses,
            "hits": self.hits,
            "misses": self.misses,
            "hit_ratio": self.hit_ratio,
        }


def replay(policy: EvictionPolicy[Hashable], trace: Iterable[Hashable]) -> ReplayResult:
    """Feed ``trace`` through ``policy`` (mutating it) and count hits.

    A resident key is a hit (``access``); a miss evicts one key when ``policy.capacity`` keys
    are resident and then inserts the missed key.
    """
    hits = misses = 0
    capacity = policy.capacity
    # bound methods hoisted out of the loop: this is the benchmark's inner loop
    contains, access = policy.__contains__, policy.access
    insert, evict = policy.insert, policy.evict
    for key in trace:
        if contains(key):
            access(key)
            hits += 1
        else:
            misses += 1
            if len(policy) >= capacity:
                evict(1)
            insert(key)
    return ReplayResult(policy.name, capacity, hits + misses, hits, misses)
