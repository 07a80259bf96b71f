"""Result types of the tiered cache API (frozen: safe to hand across threads)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from kvtier.keys import PageKey


class LookupStatus(StrEnum):
    HIT = "hit"  # `hits` leading pages are in host memory and can be loaded now
    MISS = "miss"  # nothing usable: recompute
    PENDING = "pending"  # `hits` loadable now; `pending` more are being promoted: ask again
    RETRY = "retry"  # cannot answer now (pages still being written): ask again later


@dataclass(frozen=True)
class Lookup:
    status: LookupStatus
    hits: int  # leading keys resident in the host tier, loadable now
    pending: int = 0  # keys right after `hits` being promoted from lower tiers


@dataclass(frozen=True)
class StorePlan:
    """Where the caller writes the pages it asked to store.

    `keys` is the subset of the asked keys that need writing (keys already cached are skipped),
    in the asked order; `slots[i]` is the host slot for `keys[i]`. `evicted` lists keys that
    left the host tier to make room (demoted to the next tier or dropped).
    """

    keys: tuple[PageKey, ...]
    slots: tuple[int, ...]
    evicted: tuple[PageKey, ...] = ()


@dataclass(frozen=True)
class LoadPlan:
    keys: tuple[PageKey, ...]
    slots: tuple[int, ...]


class EventKind(StrEnum):
    STORED = "stored"  # keys became available in `tier`
    REMOVED = "removed"  # keys left `tier`
    PROMOTED = "promoted"  # keys copied up from `tier` into the host tier
    DEMOTED = "demoted"  # keys moved from the host tier down into `tier`


@dataclass(frozen=True)
class CacheEvent:
    kind: EventKind
    tier: str
    keys: tuple[PageKey, ...]


@dataclass(frozen=True)
class TierCounters:
    name: str
    hits: int  # pages served from this tier (for lower tiers: promoted from it)
    pages: int  # pages held now
    used_bytes: int
    capacity_bytes: int | None
    errors: int
    corrupt: int


@dataclass(frozen=True)
class CacheStats:
    lookups: int
    lookup_keys: int
    hit_pages: int  # pages answered as host hits by lookup
    miss_pages: int
    pending_pages: int
    loads: int  # pages handed out by prepare_load
    stores: int  # pages stored (complete_store success)
    store_failures: int
    store_rejected: int  # pages prepare_store could not place (all pinned)
    evictions: int
    promotions: int
    promotion_failures: int
    demotions: int
    tiers: tuple[TierCounters, ...] = field(default_factory=tuple)

    def tier(self, name: str) -> TierCounters:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(name)
