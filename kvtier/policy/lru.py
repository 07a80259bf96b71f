"""Least-recently-used eviction."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from itertools import chain
from typing import Any

from kvtier.policy.base import EvictionPolicy, K


class LRUPolicy(EvictionPolicy[K]):
    """Evicts the least recently inserted / accessed / unpinned key.

    Unpinned keys sit in one OrderedDict, least recent first; pinned keys sit in a set outside
    it. ``capacity`` is only validated: LRU needs no sizing.
    """

    name = "lru"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._order: OrderedDict[K, None] = OrderedDict()
        self._pinned: set[K] = set()

    def insert(self, key: K) -> None:
        if key in self._order or key in self._pinned:
            raise KeyError(key)
        self._order[key] = None

    def access(self, key: K) -> None:
        if key in self._order:
            self._order.move_to_end(key)
        elif key not in self._pinned:
            raise KeyError(key)
        # a pinned key becomes most recent when it is unpinned

    def remove(self, key: K) -> None:
        if key in self._pinned:
            self._pinned.remove(key)
        else:
            del self._order[key]

    def pin(self, key: K) -> None:
        if key in self._pinned:
            return
        del self._order[key]
        self._pinned.add(key)

    def unpin(self, key: K) -> None:
        if key in self._pinned:
            self._pinned.remove(key)
            self._order[key] = None
        elif key not in self._order:
            raise KeyError(key)

    def _evict_one(self) -> K:
        return self._order.popitem(last=False)[0]

    def evictable(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order or key in self._pinned

    def __len__(self) -> int:
        return len(self._order) + len(self._pinned)

    def keys(self) -> Iterator[K]:
        return chain(iter(self._order), iter(self._pinned))

    def check_integrity(self) -> None:
        both = self._pinned.intersection(self._order)
        assert not both, f"lru: keys both pinned and in the eviction order: {both!r}"

    def snapshot(self) -> dict[str, Any]:
        return {"order": list(self._order), "pinned": set(self._pinned)}
