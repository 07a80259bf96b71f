"""Adaptive Replacement Cache (Megiddo & Modha, FAST '03).

Resident keys live in T1 (seen once recently) or T2 (seen at least twice); the ghost lists B1 and
B2 remember keys recently evicted from T1 and T2. The target size ``p`` of T1 adapts: a miss that
hits B1 means T1 was too small (grow p), a hit in B2 means T2 was too small (shrink p).

How the paper's single ``request(x)`` maps onto this split interface (the caller runs
``evict()`` first, then ``insert(x)``):

- ``evict()`` runs REPLACE: it takes the LRU key of T1 when ``|T1| > p`` and of T2 otherwise,
  and moves it to the MRU end of B1 or B2. REPLACE's tie rule (``x in B2 and |T1| == p``) needs
  the incoming key, which evict() does not get; it is left out, and ``p`` adapts in the
  following ``insert(x)``, one step later than in the paper (its step uses the ghost sizes after
  that eviction). If the stale ``p`` points at an empty T2, T1 gives the victim. On the
  benchmark traces this changes hit counts by under 0.1% against the paper's exact order
  (tests/policy/test_policy_arc_reference.py checks both).
- ``insert(x)`` applies cases II/III (a ghost hit adapts ``p`` and admits ``x`` to T2) or case
  IV (``x`` goes to T1), then trims the ghosts so that ``|T1| + |B1| <= c`` and
  ``|T1| + |T2| + |B1| + |B2| <= 2c`` (dropping the LRU of B1, then of B2), which is the case IV
  bookkeeping of the paper.
- Pinned keys count in |T1| / |T2| but sit outside the LRU orders; when REPLACE's chosen list
  has only pinned keys the other list gives the victim.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from kvtier.policy.base import EvictionPolicy, K

_T1, _T2 = 1, 2


class ARCPolicy(EvictionPolicy[K]):
    """ARC over ``capacity`` resident entries plus at most ``capacity`` ghost keys."""

    name = "arc"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._t1: OrderedDict[K, None] = OrderedDict()  # unpinned T1 keys, LRU first
        self._t2: OrderedDict[K, None] = OrderedDict()  # unpinned T2 keys, LRU first
        self._b1: OrderedDict[K, None] = OrderedDict()  # ghosts of T1, LRU first
        self._b2: OrderedDict[K, None] = OrderedDict()  # ghosts of T2, LRU first
        self._where: dict[K, int] = {}  # resident key -> _T1 or _T2 (pinned keys included)
        self._pinned: set[K] = set()
        self._n1 = 0  # |T1| including pinned keys
        self._n2 = 0  # |T2| including pinned keys
        self._p = 0.0  # target size of T1, in [0, capacity]

    @property
    def p(self) -> float:
        """ARC's adaptive target size for T1."""
        return self._p

    def insert(self, key: K) -> None:
        if key in self._where:
            raise KeyError(key)
        c = self.capacity
        if key in self._b1:  # case II: T1 was too small
            self._p = min(float(c), self._p + max(1.0, len(self._b2) / len(self._b1)))
            del self._b1[key]
            self._place(key, _T2)
        elif key in self._b2:  # case III: T2 was too small
            self._p = max(0.0, self._p - max(1.0, len(self._b1) / len(self._b2)))
            del self._b2[key]
            self._place(key, _T2)
        else:  # case IV
            self._place(key, _T1)
        self._trim_ghosts()

    def _place(self, key: K, lst: int) -> None:
        self._where[key] = lst
        if lst == _T1:
            self._n1 += 1
            self._t1[key] = None
        else:
            self._n2 += 1
            self._t2[key] = None

    def _trim_ghosts(self) -> None:
        c = self.capacity
        while self._b1 and self._n1 + len(self._b1) > c:
            self._b1.popitem(last=False)
        while (self._b1 or self._b2) and (
            self._n1 + self._n2 + len(self._b1) + len(self._b2) > 2 * c
        ):
            (self._b2 if self._b2 else self._b1).popitem(last=False)

    def access(self, key: K) -> None:
        lst = self._where[key]
        if lst == _T1:  # case I: a second reference moves the key to T2
            self._where[key] = _T2
            self._n1 -= 1
            self._n2 += 1
            if key not in self._pinned:
                del self._t1[key]
                self._t2[key] = None
        elif key not in self._pinned:
            self._t2.move_to_end(key)

    def remove(self, key: K) -> None:
        lst = self._where.pop(key)
        if lst == _T1:
            self._n1 -= 1
        else:
            self._n2 -= 1
        if key in self._pinned:
            self._pinned.remove(key)
        else:
            del (self._t1 if lst == _T1 else self._t2)[key]

    def pin(self, key: K) -> None:
        lst = self._where[key]
        if key in self._pinned:
            return
        del (self._t1 if lst == _T1 else self._t2)[key]
        self._pinned.add(key)

    def unpin(self, key: K) -> None:
        lst = self._where[key]
        if key not in self._pinned:
            return
        self._pinned.remove(key)
        (self._t1 if lst == _T1 else self._t2)[key] = None

    def _evict_one(self) -> K:
        # REPLACE: prefer T1 when it exceeds its target; fall back when that list is all pinned
        from_t1 = self._n1 > self._p
        if from_t1 and not self._t1:
            from_t1 = False
        elif not from_t1 and not self._t2:
            from_t1 = True
        if from_t1:
            key = self._t1.popitem(last=False)[0]
            self._n1 -= 1
            self._b1[key] = None
        else:
            key = self._t2.popitem(last=False)[0]
            self._n2 -= 1
            self._b2[key] = None
        del self._where[key]
        if self._n1 + self._n2 >= self.capacity:
            # only after inserts past capacity: the move to a ghost list kept the sums above c
            self._trim_ghosts()
        return key

    def evictable(self) -> int:
        return len(self._t1) + len(self._t2)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def keys(self) -> Iterator[K]:
        return iter(self._where)

    def check_integrity(self) -> None:
        c = self.capacity
        in_t1 = {k for k, lst in self._where.items() if lst == _T1}
        in_t2 = set(self._where) - in_t1
        assert set(self._where.values()) <= {_T1, _T2}, "arc: bad list tag in _where"
        assert len(in_t1) == self._n1, f"arc: |T1| counter {self._n1} != {len(in_t1)} members"
        assert len(in_t2) == self._n2, f"arc: |T2| counter {self._n2} != {len(in_t2)} members"
        assert self._pinned <= set(self._where), "arc: a pinned key is not resident"
        assert set(self._t1) == in_t1 - self._pinned, "arc: T1 order != unpinned T1 members"
        assert set(self._t2) == in_t2 - self._pinned, "arc: T2 order != unpinned T2 members"
        assert not (set(self._b1) & set(self._b2)), "arc: a key is in both B1 and B2"
        ghosts = set(self._b1) | set(self._b2)
        assert not (ghosts & set(self._where)), "arc: a key is both resident and a ghost"
        assert 0.0 <= self._p <= c, f"arc: p={self._p} outside [0, {c}]"
        assert len(self._b1) <= max(0, c - self._n1), (
            f"arc: |T1|+|B1| = {self._n1}+{len(self._b1)} exceeds c={c}"
        )
        assert len(self._b1) + len(self._b2) <= max(0, 2 * c - len(self._where)), (
            f"arc: |T1|+|T2|+|B1|+|B2| = {len(self._where)}+{len(self._b1)}+{len(self._b2)}"
            f" exceeds 2c={2 * c}"
        )

    def snapshot(self) -> dict[str, Any]:
        return {
            "t1": list(self._t1),
            "t2": list(self._t2),
            "b1": list(self._b1),
            "b2": list(self._b2),
            "where": dict(self._where),
            "pinned": set(self._pinned),
            "p": self._p,
        }
