"""S3-FIFO (Yang et al., "FIFO queues are all you need for cache eviction", SOSP '23).

Three FIFO queues: a small queue S (about 10% of the capacity) that filters one-hit wonders, a
main queue M (the rest) run as a 2-bit CLOCK, and a ghost queue G of keys only, as long as M's
target size. Following the reference implementation (libCacheSim S3FIFO, default parameters):

- a new key enters S with frequency 0, or M if it is found in G (and leaves G);
- a hit adds 1 to the key's frequency, capped at 3;
- eviction takes from M when M is over its target size (or S is empty), else from S;
- evicting from S: a tail key with frequency >= ``move_to_main_threshold`` (2, i.e. the paper's
  ``freq > 1``) moves to M with its frequency cleared, and the next tail is examined; the first
  tail below the threshold is evicted and remembered in G;
- evicting from M: a tail key with frequency >= 1 is reinserted at M's head with frequency - 1;
  the first tail with frequency 0 is evicted (no ghost entry).

Each reinsertion spends one frequency unit that an ``access`` paid for, and each move to M is
paid for by an ``insert``, so eviction is amortized O(1). Pinned keys count in their queue's size
but sit outside the FIFO orders; ``unpin`` puts a key back at the head of its queue.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from kvtier.errors import ConfigError
from kvtier.policy.base import EvictionPolicy, K

_SMALL, _MAIN = 0, 1
_MAX_FREQ = 3


class S3FIFOPolicy(EvictionPolicy[K]):
    """S3-FIFO over ``capacity`` resident entries and a ghost queue of M's target size."""

    name = "s3fifo"

    def __init__(
        self, capacity: int, small_ratio: float = 0.1, move_to_main_threshold: int = 2
    ) -> None:
        super().__init__(capacity)
        if not 0.0 < small_ratio < 1.0:
            raise ConfigError("small_ratio", small_ratio, "a fraction in (0, 1), e.g. 0.1")
        if not 1 <= move_to_main_threshold <= _MAX_FREQ:
            raise ConfigError("move_to_main_threshold", move_to_main_threshold, "1, 2 or 3")
        self.small_target = max(1, int(capacity * small_ratio))
        self.main_target = capacity - self.small_target
        self.ghost_capacity = self.main_target
        self.threshold = move_to_main_threshold
        self._small: OrderedDict[K, None] = OrderedDict()  # unpinned keys of S, tail first
        self._main: OrderedDict[K, None] = OrderedDict()  # unpinned keys of M, tail first
        self._ghost: OrderedDict[K, None] = OrderedDict()  # keys evicted from S, oldest first
        self._queue: dict[K, int] = {}  # resident key -> _SMALL or _MAIN (pinned included)
        self._freq: dict[K, int] = {}  # resident key -> 0..3
        self._pinned: set[K] = set()
        self._n_small = 0  # |S| including pinned keys
        self._n_main = 0  # |M| including pinned keys

    def insert(self, key: K) -> None:
        if key in self._queue:
            raise KeyError(key)
        self._freq[key] = 0
        if key in self._ghost:
            del self._ghost[key]
            self._queue[key] = _MAIN
            self._main[key] = None
            self._n_main += 1
        else:
            self._queue[key] = _SMALL
            self._small[key] = None
            self._n_small += 1

    def access(self, key: K) -> None:
        f = self._freq[key]
        if f < _MAX_FREQ:
            self._freq[key] = f + 1

    def remove(self, key: K) -> None:
        q = self._queue.pop(key)
        del self._freq[key]
        if q == _SMALL:
            self._n_small -= 1
        else:
            self._n_main -= 1
        if key in self._pinned:
            self._pinned.remove(key)
        else:
            del (self._small if q == _SMALL else self._main)[key]

    def pin(self, key: K) -> None:
        q = self._queue[key]
        if key in self._pinned:
            return
        del (self._small if q == _SMALL else self._main)[key]
        self._pinned.add(key)

    def unpin(self, key: K) -> None:
        q = self._queue[key]
        if key not in self._pinned:
            return
        self._pinned.remove(key)
        (self._small if q == _SMALL else self._main)[key] = None

    def _evict_one(self) -> K:
        while True:
            if self._main and (self._n_main > self.main_target or not self._small):
                return self._evict_main()
            victim = self._evict_small()
            if victim is not None:
                return victim

    def _evict_small(self) -> K | None:
        """Promote accessed tails of S to M; evict (into G) the first one that was not.

        Returns None when S ran empty by promotions: the caller then evicts from M.
        """
        small, freq = self._small, self._freq
        while small:
            key = small.popitem(last=False)[0]
            self._n_small -= 1
            if freq[key] >= self.threshold:
                freq[key] = 0
                self._queue[key] = _MAIN
                self._main[key] = None
                self._n_main += 1
                continue
            del self._queue[key]
            del freq[key]
            if self.ghost_capacity > 0:
                self._ghost[key] = None
                if len(self._ghost) > self.ghost_capacity:
                    self._ghost.popitem(last=False)
            return key
        return None

    def _evict_main(self) -> K:
        main, freq = self._main, self._freq
        while True:
            key = next(iter(main))
            f = freq[key]
            if f > 0:
                freq[key] = f - 1
                main.move_to_end(key)
                continue
            del main[key]
            del self._queue[key]
            del freq[key]
            self._n_main -= 1
            return key

    def evictable(self) -> int:
        return len(self._small) + len(self._main)

    def __contains__(self, key: object) -> bool:
        return key in self._queue

    def __len__(self) -> int:
        return len(self._queue)

    def keys(self) -> Iterator[K]:
        return iter(self._queue)

    def check_integrity(self) -> None:
        in_small = {k for k, q in self._queue.items() if q == _SMALL}
        in_main = set(self._queue) - in_small
        assert set(self._queue.values()) <= {_SMALL, _MAIN}, "s3fifo: bad queue tag"
        assert len(in_small) == self._n_small, (
            f"s3fifo: |S| counter {self._n_small} != {len(in_small)} members"
        )
        assert len(in_main) == self._n_main, (
            f"s3fifo: |M| counter {self._n_main} != {len(in_main)} members"
        )
        assert self._pinned <= set(self._queue), "s3fifo: a pinned key is not resident"
        assert set(self._small) == in_small - self._pinned, "s3fifo: S order != unpinned S keys"
        assert set(self._main) == in_main - self._pinned, "s3fifo: M order != unpinned M keys"
        assert self._freq.keys() == self._queue.keys(), "s3fifo: frequency table != resident keys"
        bad = {k: f for k, f in self._freq.items() if not 0 <= f <= _MAX_FREQ}
        assert not bad, f"s3fifo: frequencies outside 0..{_MAX_FREQ}: {bad}"
        assert not (set(self._ghost) & set(self._queue)), "s3fifo: a key is resident and a ghost"
        assert len(self._ghost) <= self.ghost_capacity, (
            f"s3fifo: ghost queue holds {len(self._ghost)} > {self.ghost_capacity} keys"
        )
        assert self.small_target + self.main_target == self.capacity, "s3fifo: queue targets"

    def snapshot(self) -> dict[str, Any]:
        return {
            "small": list(self._small),
            "main": list(self._main),
            "ghost": list(self._ghost),
            "queue": dict(self._queue),
            "freq": dict(self._freq),
            "pinned": set(self._pinned),
        }
