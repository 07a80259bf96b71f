"""Stateful property tests: every policy against a plain set model, over random op sequences."""

from __future__ import annotations

from collections.abc import Hashable

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvtier.errors import EvictionError
from kvtier.policy import POLICIES, EvictionPolicy, make_policy

KEYS = st.integers(min_value=0, max_value=15)


class PolicyMachine(RuleBasedStateMachine):
    """Drives one policy with insert / access / remove / pin / unpin / evict.

    The model is the resident set and the pinned set; the policy chooses victims freely but
    must return exactly n distinct resident unpinned keys, or raise and change nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        self.policy: EvictionPolicy[Hashable] = make_policy("lru", 1)
        self.resident: set[int] = set()
        self.pinned: set[int] = set()

    @initialize(name=st.sampled_from(sorted(POLICIES)), capacity=st.integers(1, 8))
    def start(self, name: str, capacity: int) -> None:
        self.policy = make_policy(name, capacity)

    @rule(key=KEYS)
    def insert(self, key: int) -> None:
        # inserts past capacity are part of the contract (tolerated), so no eviction first
        if key in self.resident:
            before = self.policy.snapshot()
            with pytest.raises(KeyError):
                self.policy.insert(key)
            assert self.policy.snapshot() == before
        else:
            self.policy.insert(key)
            self.resident.add(key)

    @rule(key=KEYS)
    def insert_like_a_cache(self, key: int) -> None:
        if key in self.resident:
            self.policy.access(key)
            return
        if len(self.policy) >= self.policy.capacity:
            if self.policy.evictable() == 0:
                return
            (victim,) = self.policy.evict(1)
            self._evicted([victim])
        self.policy.insert(key)
        self.resident.add(key)

    @rule(key=KEYS)
    def access(self, key: int) -> None:
        if key in self.resident:
            self.policy.access(key)
        else:
            with pytest.raises(KeyError):
                self.policy.access(key)

    @rule(key=KEYS)
    def remove(self, key: int) -> None:
        if key in self.resident:
            self.policy.remove(key)
            self.resident.discard(key)
            self.pinned.discard(key)
        else:
            with pytest.raises(KeyError):
                self.policy.remove(key)

    @rule(key=KEYS)
    def pin(self, key: int) -> None:
        if key in self.resident:
            self.policy.pin(key)
            self.pinned.add(key)
        else:
            with pytest.raises(KeyError):
                self.policy.pin(key)

    @rule(key=KEYS)
    def unpin(self, key: int) -> None:
        if key in self.resident:
            self.policy.unpin(key)
            self.pinned.discard(key)
        else:
            with pytest.raises(KeyError):
                self.policy.unpin(key)

    @rule(n=st.integers(0, 5))
    def evict(self, n: int) -> None:
        available = len(self.resident - self.pinned)
        if n > available:
            before = self.policy.snapshot()
            with pytest.raises(EvictionError):
                self.policy.evict(n)
            assert self.policy.snapshot() == before, "a failed evict changed the policy state"
            return
        victims = self.policy.evict(n)
        assert len(victims) == n
        self._evicted(victims)

    def _evicted(self, victims: list[Hashable]) -> None:
        assert len(set(victims)) == len(victims), f"duplicate victims {victims}"
        for v in victims:
            assert v in self.resident, f"evicted {v!r}, which was not resident"
            assert v not in self.pinned, f"evicted pinned key {v!r}"
            self.resident.discard(v)

    @invariant()
    def agrees_with_model(self) -> None:
        p = self.policy
        p.check_integrity()
        assert len(p) == len(self.resident)
        assert p.evictable() == len(self.resident - self.pinned)
        assert set(p.keys()) == self.resident
        for k in range(16):
            assert (k in p) == (k in self.resident)


PolicyMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestPolicyMachine = PolicyMachine.TestCase
