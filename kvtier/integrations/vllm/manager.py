"""Scheduler side: vLLM's OffloadingManager answered by kvtier's TieredCache.

vLLM asks about one offload key at a time (a chunk of one KV-cache group: its block hash plus the
group index); kvtier keys are `key_from_engine_hash(namespace, offload_key)`, so the namespace
(model, page geometry, block layout, rank) keeps foreign KV out.

Lookup results: a page in host memory is HIT; a page that a lower tier holds starts a staged
promotion and answers HIT_PENDING (vLLM asks again on a later step, and keeps stepping while
`has_pending_work()`); a page still being written by another request is RETRY; else MISS.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vllm.v1.kv_offload.base import (
    LoadStoreSpec,
    Locality,
    LookupResult,
    Medium,
    OffloadingEvent,
    OffloadingManager,
    OffloadKey,
    PrepareStoreOutput,
    ReqContext,
    RequestOffloadingContext,
    ScheduleEndContext,
    TierFilter,
    get_offload_group_idx,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvtier.cache import TieredCache
from kvtier.cache.types import CacheEvent, CacheStats, EventKind, LookupStatus
from kvtier.integrations.vllm.common import KVTierLoadStoreSpec
from kvtier.keys import Namespace, PageKey, key_from_engine_hash

log = logging.getLogger("kvtier.vllm")

_KEY_MAP_LIMIT = 1 << 20  # kvtier key -> vLLM key entries kept for events and hit sources
_SOURCES = {"disk": CacheHitSource.DISK, "mooncake": CacheHitSource.P2P}


class KVTierOffloadingManager(OffloadingManager):
    """Maps vLLM's per-chunk calls onto one TieredCache. Runs on the scheduler thread only.

    `group_pos` maps a vLLM KV-cache group id to its position in OffloadingConfig.groups (what
    the worker indexes its per-group device views with). `tier_kinds` maps tier names to kinds
    (for the hit source reported to vLLM's metrics). With `emit_events`, kvtier's cache events
    become vLLM OffloadingEvents (host tier: Medium.CPU; lower tiers: Medium.STORAGE, owned by
    the tier's name).
    """

    def __init__(
        self,
        cache: TieredCache,
        namespace: Namespace,
        group_pos: dict[int, int],
        *,
        tier_kinds: dict[str, str] | None = None,
        emit_events: bool = False,
        stats_path: str | os.PathLike[str] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.cache = cache
        self.namespace = namespace
        self.group_pos = group_pos
        self.tier_kinds = tier_kinds or {}
        self.emit_events = emit_events
        self._vkey: OrderedDict[PageKey, OffloadKey] = OrderedDict()
        self._promoted_from: dict[PageKey, str] = {}  # promoted, not loaded yet: tier name
        self._load_src: dict[PageKey, str] = {}  # the same, for the last prepare_load
        self._events: list[OffloadingEvent] = []
        self._pending = 0  # keys last reported HIT_PENDING and not yet seen HIT
        self._scan_req: str | None = None  # request whose prefix is being looked up
        self._scan: list[PageKey] = []  # its keys answered HIT so far (most recent last)
        self._scan_limit = max(1, cache.config.max_promotion_pages)
        self._stats_path = Path(stats_path) if stats_path else None
        self._last_stats: dict[str, Any] | None = None
        self._on_close = on_close
        self._writing: set[PageKey] = set()  # planned stores vLLM has not completed
        self._reading: Counter[PageKey] = Counter()  # leases of loads not completed

    # -- keys --------------------------------------------------------------------------------
    def _key(self, key: OffloadKey) -> PageKey:
        k = key_from_engine_hash(self.namespace, bytes(key))
        if k not in self._vkey:
            self._vkey[k] = key
            if len(self._vkey) > _KEY_MAP_LIMIT:
                self._vkey.popitem(last=False)
        return k

    def _keys(self, keys: Iterable[OffloadKey]) -> list[PageKey]:
        return [self._key(k) for k in keys]

    # -- OffloadingManager -------------------------------------------------------------------
    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        flt = req_context.load_tier_filter
        if flt is not TierFilter.ALL and not flt.allows(Medium.CPU, Locality.LOCAL):
            return LookupResult.MISS  # the request may not load from host memory at all
        result = self._lookup(key, req_context)
        if result is LookupResult.HIT_PENDING and not flt.allows(Medium.STORAGE, None):
            return LookupResult.MISS  # only a lower tier has it, and the request refuses those
        return result

    def _lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        k = self._key(key)
        # vLLM asks key by key along a request's prefix. The keys already answered HIT in this
        # scan go first, so that a promotion started for this key never evicts them (with a
        # small host tier that would thrash: each deferred re-scan undoing the last one).
        scan = self._scan if self._scan_req == req_context.req_id else []
        if k in scan:  # a new scan of the same request (deferred lookups start over)
            scan = []
        # Not in host memory: ask about the request's following pages too, so that one
        # promotion job brings the whole run up from a lower tier instead of one job per page.
        tail = self._following(key, req_context) if self.cache.host.state(k) is None else []
        res = self.cache.lookup([*scan, k, *tail])
        if res.hits > len(scan):
            self._scan_req = req_context.req_id
            self._scan = [*scan, k][-self._scan_limit :]
            return LookupResult.HIT
        self._scan_req, self._scan = None, []
        if res.hits < len(scan):  # an earlier page left meanwhile: ask about this one alone
            res = self.cache.lookup([k])
            if res.status == LookupStatus.HIT:
                return LookupResult.HIT
        if res.status == LookupStatus.PENDING:
            self._pending += 1
            return LookupResult.HIT_PENDING
        if res.status == LookupStatus.RETRY:
            self._pending += 1
            return LookupResult.RETRY
        return LookupResult.MISS

    def _following(self, key: OffloadKey, req_context: ReqContext) -> list[PageKey]:
        """The request's keys after `key` in the same group, in prefix order (vLLM records each
        key's end token in the request context; without that record, none)."""
        positions = getattr(req_context, "_offload_key_positions", None)
        mine = positions.get(key) if positions else None
        if mine is None or positions is None:
            return []
        group = get_offload_group_idx(key)
        later = sorted(
            (p, k) for k, p in positions.items() if p > mine and get_offload_group_idx(k) == group
        )
        return [self._key(k) for _, k in later[: self._scan_limit - 1]]

    def get_load_source(self, key: OffloadKey, req_context: ReqContext) -> CacheHitSource:
        self._drain_events()
        k = self._key(key)
        tier = self._load_src.get(k) or self._promoted_from.get(k)
        if tier is None:
            return CacheHitSource.HOST
        return _SOURCES.get(self.tier_kinds.get(tier, tier), CacheHitSource.EXTERNAL_UNSPECIFIED)

    def prepare_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> LoadStoreSpec:
        plan = self.cache.prepare_load(self._keys(keys))
        self._reading.update(plan.keys)
        groups = [self.group_pos[get_offload_group_idx(k)] for k in keys]
        # vLLM asks for the hit source right after this; later loads are host hits.
        self._load_src = {k: t for k in plan.keys if (t := self._promoted_from.pop(k, None))}
        return KVTierLoadStoreSpec(plan.slots, groups)

    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        self.cache.touch(self._keys(keys))

    def complete_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        ours = self._keys(keys)
        self._reading.subtract(ours)
        self._reading = +self._reading
        self.cache.complete_load(ours)

    def prepare_store(
        self, keys: Collection[OffloadKey], req_context: ReqContext
    ) -> PrepareStoreOutput | None:
        ours = self._keys(keys)
        plan = self.cache.prepare_store(ours)
        if plan is None:
            return None
        self._writing.update(plan.keys)
        to_store = [self._vkey[k] for k in plan.keys]
        groups = [self.group_pos[get_offload_group_idx(k)] for k in to_store]
        evicted = [self._vkey[k] for k in plan.evicted if k in self._vkey]
        return PrepareStoreOutput(
            keys_to_store=to_store,
            store_spec=KVTierLoadStoreSpec(plan.slots, groups),
            evicted_keys=evicted,
        )

    def complete_store(
        self, keys: Collection[OffloadKey], req_context: ReqContext, success: bool = True
    ) -> None:
        ours = self._keys(keys)
        self._writing.difference_update(ours)
        self.cache.complete_store(ours, success)

    def reset_cache(self) -> None:
        """vLLM forgets every job in flight (it never completes them): give their leases back.
        Pages already stored stay: their keys still name exactly their KV."""
        if self._writing:
            self.cache.complete_store(list(self._writing), success=False)
        for key, n in self._reading.items():
            for _ in range(n):
                self.cache.complete_load([key])
        self._writing.clear()
        self._reading.clear()
        self._scan_req, self._scan = None, []

    def on_schedule_end(self, context: ScheduleEndContext) -> None:
        self.cache.poll()
        self._drain_events()
        if self._stats_path is not None:
            self._write_stats()

    def has_pending_work(self) -> bool:
        # Promotions in flight: keep the engine stepping so the deferred lookups are asked again.
        pending, self._pending = self._pending > 0, 0
        return pending

    def take_events(self) -> Iterable[OffloadingEvent]:
        self._drain_events()
        out, self._events = self._events, []
        return out

    def get_stats(self) -> None:
        return None

    def stats(self) -> CacheStats:
        return self.cache.stats()

    def shutdown(self) -> None:
        self.cache.close()
        if self._stats_path is not None:
            self._write_stats()
        if self._on_close is not None:
            self._on_close()
            self._on_close = None

    def _write_stats(self) -> None:
        """Publish the counters as JSON (the engine runs in another process than its caller)."""
        doc = stats_doc(self.cache.stats())
        if doc == self._last_stats or self._stats_path is None:
            return
        self._last_stats = doc
        tmp = self._stats_path.with_name(self._stats_path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, self._stats_path)
        except OSError as exc:  # stats are best effort; never fail the engine for them
            log.warning("cannot write kvtier stats to %s: %s", self._stats_path, exc)
            self._stats_path = None

    # -- events ------------------------------------------------------------------------------
    def _drain_events(self) -> None:
        for ev in self.cache.take_events():
            if ev.kind == EventKind.PROMOTED:
                for k in ev.keys:
                    self._promoted_from[k] = ev.tier
            elif ev.kind == EventKind.REMOVED and ev.tier == "host":
                for k in ev.keys:
                    self._promoted_from.pop(k, None)
            if self.emit_events:
                out = self._to_vllm(ev)
                if out is not None:
                    self._events.append(out)

    def _to_vllm(self, ev: CacheEvent) -> OffloadingEvent | None:
        keys = [self._vkey[k] for k in ev.keys if k in self._vkey]
        if not keys:
            return None
        if ev.kind == EventKind.PROMOTED:  # a copy now also lives in host memory
            return OffloadingEvent(keys, Medium.CPU, removed=False, locality=Locality.LOCAL)
        removed = ev.kind == EventKind.REMOVED
        if ev.tier == "host":
            return OffloadingEvent(keys, Medium.CPU, removed=removed, locality=Locality.LOCAL)
        kind = self.tier_kinds.get(ev.tier, ev.tier)
        locality = Locality.LOCAL if kind == "disk" else Locality.REMOTE
        return OffloadingEvent(
            keys, Medium.STORAGE, removed=removed, locality=locality, ownership=ev.tier
        )


def stats_doc(stats: CacheStats) -> dict[str, Any]:
    """CacheStats as plain JSON values; `hits` maps tier name -> pages loaded from it."""
    doc = asdict(stats)
    doc["tiers"] = {t.name: asdict(t) for t in stats.tiers}
    doc["hits"] = {t.name: t.hits for t in stats.tiers}
    return doc
