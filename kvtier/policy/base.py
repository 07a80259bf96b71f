"""The eviction-policy contract the tiered cache is written against.

A policy tracks *which* keys are resident and chooses victims; it owns no data and does no I/O.
Capacity is counted in entries (pages). The caller decides when the tier is full and calls
``evict()`` before ``insert()``; a policy never evicts on its own.

Pinning: the cache keeps per-key reference counts and calls ``pin`` on 0 -> 1 and ``unpin`` on
1 -> 0. Every policy here takes a pinned key *out of its eviction order* (it stays resident and
counted in the sizes its algorithm uses) and puts it back at the most-recent end of its list or
queue on ``unpin``: a pinned page is in flight, i.e. in use right now. This keeps ``evict`` free
of scans over pinned keys, so every operation is O(1) (S3-FIFO's reinsertions are amortized O(1):
each one spends a frequency credit that an earlier ``access`` paid for).

None of the policies are thread-safe: the cache serializes calls under its own lock.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterator
from typing import Any, ClassVar, Generic, TypeVar

from kvtier.errors import ConfigError, EvictionError

K = TypeVar("K", bound=Hashable)


class EvictionPolicy(ABC, Generic[K]):
    """Resident-key bookkeeping and victim choice for one cache tier.

    Contract shared by every implementation:

    - ``insert(key)`` makes ``key`` resident and unpinned. It raises ``KeyError`` if ``key`` is
      already resident and never evicts; a key remembered in a ghost list is admitted the way the
      algorithm says (ARC adapts its target, S3-FIFO admits into the main queue). Inserting past
      ``capacity`` is tolerated (the ghost lists shrink to keep their bounds).
    - ``access(key)`` records a hit on a resident key (pinned or not); ``KeyError`` otherwise.
    - ``remove(key)`` drops a resident key without leaving a ghost entry (invalidated or failed
      pages); a pinned key may be removed and its pin goes with it. ``KeyError`` if not resident.
    - ``pin`` / ``unpin`` have set semantics (idempotent) and raise ``KeyError`` for a key that is
      not resident. A pinned key is never returned by ``evict``.
    - ``evict(n)`` removes and returns exactly ``n`` distinct resident unpinned keys, or raises
      ``EvictionError`` and changes nothing when fewer than ``n`` are evictable.
    - ``evictable()``, ``len()``, ``in`` are O(1); ``keys()`` iterates resident keys in any order.
    - ``check_integrity()`` raises ``AssertionError`` naming the broken invariant.
    """

    name: ClassVar[str]

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
            raise ConfigError("capacity", capacity, "a positive integer number of pages")
        self.capacity = capacity

    @abstractmethod
    def insert(self, key: K) -> None:
        """Make ``key`` resident (unpinned). Raises KeyError if it already is."""

    @abstractmethod
    def access(self, key: K) -> None:
        """Record a hit on resident ``key``. Raises KeyError if it is not resident."""

    @abstractmethod
    def remove(self, key: K) -> None:
        """Drop resident ``key`` (and its pin) without a ghost entry. KeyError if absent."""

    @abstractmethod
    def pin(self, key: K) -> None:
        """Keep resident ``key`` from eviction until ``unpin``. Idempotent; KeyError if absent."""

    @abstractmethod
    def unpin(self, key: K) -> None:
        """Make resident ``key`` evictable again. Idempotent; KeyError if absent."""

    @abstractmethod
    def _evict_one(self) -> K:
        """Remove and return one victim; only called when ``evictable() > 0``."""

    @abstractmethod
    def evictable(self) -> int:
        """Number of resident unpinned keys."""

    @abstractmethod
    def __contains__(self, key: object) -> bool:
        """True if ``key`` is resident (pinned or not)."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of resident keys."""

    @abstractmethod
    def keys(self) -> Iterator[K]:
        """Resident keys, in no particular order."""

    @abstractmethod
    def check_integrity(self) -> None:
        """Assert every internal invariant; raises AssertionError with a clear message."""

    @abstractmethod
    def snapshot(self) -> dict[str, Any]:
        """The full internal state as plain values (O(n); for tests and debugging)."""

    def evict(self, n: int = 1) -> list[K]:
        """Remove and return exactly ``n`` resident unpinned keys chosen by the algorithm.

        Atomic: when fewer than ``n`` keys are evictable, raises EvictionError before touching
        any state. Because pinned keys live outside the eviction order, each single eviction
        cannot fail once the count check passed, so no rollback is needed.
        """
        if n < 0:
            raise ValueError(f"evict: n must be >= 0, got {n}")
        available = self.evictable()
        if available < n:
            raise EvictionError(
                f"{self.name}: asked to evict {n} keys but only {available} of "
                f"{len(self)} resident keys are unpinned"
            )
        return [self._evict_one() for _ in range(n)]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(capacity={self.capacity}, resident={len(self)}, "
            f"evictable={self.evictable()})"
        )
