"""The tiered cache: the API an engine calls.

One lock serialises the bookkeeping; I/O never runs under it. Pages move one way at a time:
engine -> host slot (prepare_store / complete_store) -> lower tiers (cascade or demotion, sealed
first on a background thread), and back: lower tier -> host slot (staged promotion started by
lookup) -> engine (prepare_load / complete_load).

Every in-flight reader or writer of a host page holds a lease: the engine's store (until
complete_store), each engine load (until complete_load), each promotion (until its tier reports)
and each lower-tier store reading the slot (until its tier reports). `check_integrity()` proves
that the host tier's reference counts equal the leases held.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, cast

from kvtier.cache.config import CacheConfig
from kvtier.cache.jobs import Job, JobKind, Sealer
from kvtier.cache.types import (
    CacheEvent,
    CacheStats,
    EventKind,
    LoadPlan,
    Lookup,
    LookupStatus,
    StorePlan,
    TierCounters,
)
from kvtier.errors import ConfigError
from kvtier.keys import Namespace, PageKey
from kvtier.memory.host_pool import HostPool
from kvtier.memory.segments import SegmentRegistry, check_name
from kvtier.policy import EvictionPolicy, make_policy
from kvtier.tiers.base import SecondaryTier, TierContext
from kvtier.tiers.host import HostTier, PageState
from kvtier.tiers.registry import make_tier

log = logging.getLogger("kvtier.cache")
_COUNTERS = (
    "lookups", "lookup_keys", "hit_pages", "miss_pages", "pending_pages", "loads", "stores",
    "store_failures", "store_rejected", "evictions", "promotions", "promotion_failures",
    "demotions",
)  # fmt: skip


class TieredCache:
    """Host tier + an ordered chain of secondary tiers. Thread-safe."""

    def __init__(
        self,
        config: CacheConfig | Mapping[str, Any] | str | os.PathLike[str] | None,
        namespace: Namespace,
        *,
        host_pool: HostPool | None = None,
        background: bool = True,
    ) -> None:
        self.config = CacheConfig.load(config)
        self.namespace = namespace
        payload = namespace.geometry.page_bytes
        host = self.config.host
        if host_pool is None:
            host_pool = HostPool.for_budget(
                host.budget, payload, pin=host.pin, shm_path=host.shm_path
            )
        elif host_pool.payload_bytes != payload:
            raise ConfigError(
                "host_pool.payload_bytes",
                host_pool.payload_bytes,
                f"{payload} (the namespace geometry's page_bytes)",
            )
        self.host_pool = host_pool
        policy = cast("EvictionPolicy[PageKey]", make_policy(host.policy, host_pool.num_slots))
        self.host = HostTier(host_pool, policy)
        ctx = TierContext(namespace.fingerprint, payload)
        self.tiers: list[SecondaryTier] = []
        try:
            for t in self.config.tiers:
                self.tiers.append(make_tier(t.kind, t.name, t.options, ctx))
        except BaseException:
            for tier in self.tiers:
                tier.close()
            raise
        buf = host_pool.tensor
        try:
            for tier in self.tiers:
                tier.register_host_memory(buf.data_ptr(), buf.numel())
        except BaseException:
            for tier in self.tiers:
                tier.close()
            raise
        modes = [t.mode for t in self.config.tiers]
        self._through = [i for i, m in enumerate(modes) if m == "write_through"]
        self._demote = [i for i, m in enumerate(modes) if m == "demote"]
        # Demotion frees a slot only once the page is copied out, so keep some slots free ahead.
        self._headroom = (
            max(1, int(self.config.headroom * host_pool.num_slots)) if self._demote else 0
        )

        self._lock = threading.RLock()
        self._leases: Counter[PageKey] = Counter()  # key -> leases held (== host refs)
        self._writing: set[PageKey] = set()  # engine stores between prepare and complete
        self._promoting: dict[PageKey, int] = {}  # key -> tier index it is promoted from
        self._origin: dict[PageKey, int] = {}  # promoted key -> tier index, until first load
        self._jobs: dict[tuple[int, int], Job] = {}
        self._events: list[CacheEvent] = []
        self._count = dict.fromkeys(_COUNTERS, 0)
        self._tier_hits = [0] * (len(self.tiers) + 1)  # index 0: host
        self._sealer = Sealer(self)
        self._closed = False
        self._pump: threading.Thread | None = None
        self._stop = threading.Event()
        self._registry: SegmentRegistry | None = None
        if self.config.segment is not None:
            check_name(self.config.segment)
            self._registry = SegmentRegistry()
        self._published = 0.0
        if background and (self.tiers or self._registry is not None):
            self._pump = threading.Thread(target=self._pump_loop, name="kvtier-cache", daemon=True)
            self._pump.start()

    # -- engine API ----------------------------------------------------------------------------
    def lookup(self, keys: Sequence[PageKey]) -> Lookup:
        """How many leading keys can be loaded now; starts promotion of the keys right after
        them that a lower tier holds (status PENDING: ask again)."""
        with self._lock:
            if self._jobs:
                self._poll_locked()
            c = self._count
            c["lookups"] += 1
            c["lookup_keys"] += len(keys)
            hits = self._ready_prefix(keys)
            rest = keys[hits:]
            status = LookupStatus.HIT if hits else LookupStatus.MISS
            pending = 0
            if rest:
                state = self.host.state(rest[0])
                if state == PageState.WRITING:
                    if rest[0] in self._promoting:
                        pending = self._promoting_prefix(rest)
                        status = LookupStatus.PENDING
                    else:
                        status = LookupStatus.RETRY
                elif self.tiers:
                    batch = rest[: self.config.max_promotion_pages]
                    pending = self._start_promotion(batch, protect=keys[:hits])
                    if pending:
                        status = LookupStatus.PENDING
            c["hit_pages"] += hits
            c["pending_pages"] += pending
            c["miss_pages"] += len(keys) - hits - pending
            return Lookup(status, hits, pending)

    def prepare_load(self, keys: Sequence[PageKey]) -> LoadPlan:
        """Lease the pages for reading; KeyError (nothing leased) if any is not loadable."""
        with self._lock:
            slots: list[int] = []
            try:
                for key in keys:
                    slots.append(self.host.acquire(key))
                    self._leases[key] += 1
            except KeyError:
                for key in keys[: len(slots)]:
                    self._release(key)
                raise
            self._count["loads"] += len(keys)
            for key in keys:
                self._tier_hits[self._origin.pop(key, -1) + 1] += 1
            return LoadPlan(tuple(keys), tuple(slots))

    def complete_load(self, keys: Sequence[PageKey]) -> None:
        with self._lock:
            for key in keys:
                self._release(key)

    def prepare_store(self, keys: Sequence[PageKey]) -> StorePlan | None:
        """Reserve slots for the keys not yet cached (in order, deduplicated). A prefix of them is
        planned when room is short; None when no slot can be had (every page is pinned)."""
        with self._lock:
            if self._jobs:
                self._poll_locked()
            todo: list[PageKey] = []
            seen: set[PageKey] = set()
            for key in keys:
                if key in seen:
                    continue
                seen.add(key)
                state = self.host.state(key)
                if state is None:
                    todo.append(key)
                elif state == PageState.DEMOTING:
                    self._resurrect(key)
            if not todo:
                return StorePlan((), (), ())
            evicted = self._make_room(len(todo))
            room = min(len(todo), self.host_pool.num_free)
            if room == 0:
                self._count["store_rejected"] += len(todo)
                return None
            self._count["store_rejected"] += len(todo) - room
            todo = todo[:room]
            slots = self.host.reserve(todo)
            assert slots is not None  # room <= num_free
            for key in todo:
                self._writing.add(key)
                self._leases[key] += 1
            return StorePlan(tuple(todo), tuple(slots), tuple(evicted))

    def complete_store(self, keys: Sequence[PageKey], success: bool = True) -> None:
        """Publish (or, on failure, free) pages planned by prepare_store. Keys that were not
        planned (already cached) are ignored. Published pages cascade to write-through tiers."""
        with self._lock:
            done = [k for k in keys if k in self._writing]
            for key in done:
                self._writing.discard(key)
                self._leases[key] -= 1
                if success:
                    self.host.publish(key)
                else:
                    self.host.abort(key)
            if not done:
                return
            if success:
                self._count["stores"] += len(done)
                self._events.append(CacheEvent(EventKind.STORED, "host", tuple(done)))
                if self._through:
                    self._send_down(JobKind.CASCADE, done, self._through)
            else:
                self._count["store_failures"] += len(done)
                for key in done:
                    if not self._leases[key]:
                        del self._leases[key]

    def touch(self, keys: Sequence[PageKey]) -> None:
        with self._lock:
            policy = self.host.policy
            for key in keys:
                if self.host.state(key) == PageState.READY:
                    policy.access(key)

    def take_events(self) -> list[CacheEvent]:
        with self._lock:
            self._collect_removed()
            out, self._events = self._events, []
            return out

    def poll(self) -> None:
        """Advance background work: finished tier jobs, early demotion for headroom."""
        with self._lock:
            self._poll_locked()

    # -- internals (called under the lock) ------------------------------------------------------
    def _ready_prefix(self, keys: Sequence[PageKey]) -> int:
        hits = self.host.ready_prefix(keys)
        # A page being demoted still holds its bytes: take it back instead of missing.
        while hits < len(keys) and self.host.state(keys[hits]) == PageState.DEMOTING:
            self._resurrect(keys[hits])
            hits += self.host.ready_prefix(keys[hits:])
        return hits

    def _resurrect(self, key: PageKey) -> None:
        page = self.host.pages[key]
        page.state = PageState.READY
        self.host.policy.insert(key)
        if page.refs:
            self.host.policy.pin(key)

    def _promoting_prefix(self, keys: Sequence[PageKey]) -> int:
        n = 0
        for key in keys:
            if key not in self._promoting:
                break
            n += 1
        return n

    def _start_promotion(self, keys: Sequence[PageKey], protect: Sequence[PageKey]) -> int:
        """Find the leading keys held by lower tiers, reserve host slots and start the loads.
        Returns how many leading keys are now being promoted. The pages in `protect` (the hit
        prefix of the same lookup) are never evicted to make room: that would thrash."""
        found = [-1] * len(keys)
        for ti, tier in enumerate(self.tiers):
            idx = [i for i, f in enumerate(found) if f < 0]
            if not idx:
                break
            for i, present in zip(idx, tier.contains([keys[i] for i in idx])):
                if present:
                    found[i] = ti
        n = next((i for i, f in enumerate(found) if f < 0), len(keys))
        # Keys already in host memory in another state end the run (a concurrent writer).
        n = next((i for i in range(n) if keys[i] in self.host), n)
        # Never promote past what host memory can hold next to the hit prefix (less the slots
        # kept free for demotion): the excess would evict the prefix and the lookup would chase
        # its own tail.
        n = min(n, self.host_pool.num_slots - self._headroom - len(protect))
        if n <= 0:
            return 0
        policy = self.host.policy
        shielded = [k for k in protect if not self.host.pages[k].refs]
        for key in shielded:
            policy.pin(key)
        try:
            self._make_room(n)
        finally:
            for key in shielded:
                policy.unpin(key)
        n = min(n, self.host_pool.num_free)  # a full host tier turns the rest into misses
        if n == 0:
            return 0
        keys = keys[:n]
        self.host.reserve(keys)
        by_tier: dict[int, list[PageKey]] = {}
        for key, ti in zip(keys, found):
            by_tier.setdefault(ti, []).append(key)
            self._leases[key] += 1
            self._promoting[key] = ti
        for ti, tkeys in by_tier.items():
            items = [(k, self.host_pool.blob(self.host.slot(k))) for k in tkeys]
            job_id = self.tiers[ti].submit_load(items)
            if job_id is None:  # back-pressure: these become misses now
                self._finish_promotion(ti, [], tkeys)
            else:
                self._jobs[(ti, job_id)] = Job(JobKind.PROMOTE, tuple(tkeys))
        return self._promoting_prefix(keys)

    def _finish_promotion(self, ti: int, ok: Sequence[PageKey], failed: Sequence[PageKey]) -> None:
        for key in ok:
            del self._promoting[key]
            self._leases[key] -= 1
            self.host.pages[key].sealed = True
            self.host.publish(key)
            self._origin[key] = ti
        for key in failed:
            del self._promoting[key]
            self._leases[key] -= 1
            self.host.abort(key)
        for key in (*ok, *failed):
            if not self._leases[key]:
                del self._leases[key]
        if ok:
            self._count["promotions"] += len(ok)
            self._events.append(CacheEvent(EventKind.PROMOTED, self.tiers[ti].name, tuple(ok)))
        self._count["promotion_failures"] += len(failed)

    def _make_room(self, n: int) -> list[PageKey]:
        """Evict so that up to n slots are free (as many as evictable pages allow)."""
        short = min(n - self.host_pool.num_free, self.host.policy.evictable())
        if short <= 0:
            return []
        victims = self.host.make_room(self.host_pool.num_free + short)
        self._evict(victims)
        return victims

    def _evict(self, victims: Sequence[PageKey]) -> None:
        if not victims:
            return
        self._count["evictions"] += len(victims)
        self._events.append(CacheEvent(EventKind.REMOVED, "host", tuple(victims)))
        for key in victims:
            self._origin.pop(key, None)
        if self._demote:
            for key in victims:
                self.host.start_demote(key)  # the demotion's lease is the sender's below
                self._leases[key] += 1
            self._send_down(JobKind.DEMOTE, victims, self._demote, leased=True)
        else:
            for key in victims:
                self.host.drop(key)

    def _send_down(
        self, kind: JobKind, keys: Sequence[PageKey], tiers: Sequence[int], leased: bool = False
    ) -> None:
        """Lease each page once per tier and hand the batch to the sealer thread, which seals the
        blobs and submits them. `leased`: the caller already holds one lease per key."""
        for i, _ in enumerate(tiers):
            if leased and i == 0:
                continue
            for key in keys:
                self.host.acquire_any(key)
                self._leases[key] += 1
        self._sealer.submit(kind, tuple(keys), tuple(tiers))

    def _release(self, key: PageKey) -> None:
        self.host.release(key)
        self._leases[key] -= 1
        if not self._leases[key]:
            del self._leases[key]

    def _poll_locked(self) -> None:
        for ti, tier in enumerate(self.tiers):
            for res in tier.poll():
                job = self._jobs.pop((ti, res.job_id), None)
                if job is None:
                    continue
                if job.kind == JobKind.PROMOTE:
                    self._finish_promotion(ti, res.ok, res.failed)
                    continue
                for key in job.keys:
                    self._release(key)
                if res.ok:
                    kind = EventKind.DEMOTED if job.kind == JobKind.DEMOTE else EventKind.STORED
                    self._events.append(CacheEvent(kind, tier.name, res.ok))
                    if job.kind == JobKind.DEMOTE:
                        self._count["demotions"] += len(res.ok)
        if self._headroom and self.host_pool.num_free < self._headroom:
            want = min(self._headroom - self.host_pool.num_free, self.host.policy.evictable())
            if want > 0:
                self._evict(self.host.policy.evict(want))

    def _collect_removed(self) -> None:
        for tier in self.tiers:
            removed = tier.take_removed()
            if removed:
                self._events.append(CacheEvent(EventKind.REMOVED, tier.name, tuple(removed)))

    def _pump_loop(self) -> None:
        while not self._stop.wait(0.005):
            if self._jobs or self._sealer.busy():
                with self._lock:
                    self._poll_locked()
            if self._registry is not None and time.monotonic() - self._published > 1.0:
                self.publish_stats()

    def publish_stats(self) -> None:
        """Write per-tier counters to the segment's stats file (read by `kvtier top`)."""
        if self._registry is None or self.config.segment is None:
            return
        self._published = time.monotonic()
        stats = self.stats()
        tiers = {
            t.name: {"hits": float(t.hits), "misses": float(stats.miss_pages),
                     "pages": float(t.pages), "bytes": float(t.used_bytes)}
            for t in stats.tiers
        }  # fmt: skip
        try:
            self._registry.write_stats(self.config.segment, tiers)
        except OSError as exc:  # statistics are best effort; never a fault in the engine
            log.debug("could not publish stats: %s", exc)

    # -- stats and integrity ---------------------------------------------------------------------
    def stats(self) -> CacheStats:
        with self._lock:
            ready = self.host.pages_in([PageState.READY])
            tiers = [
                TierCounters(
                    "host",
                    self._tier_hits[0],
                    ready,
                    ready * self.host_pool.slot_bytes,
                    self.host_pool.capacity_bytes,
                    0,
                    0,
                )
            ]
            for ti, tier in enumerate(self.tiers):
                s = tier.stats()
                tiers.append(
                    TierCounters(
                        tier.name,
                        self._tier_hits[ti + 1],
                        s.pages,
                        s.used_bytes,
                        s.capacity_bytes,
                        s.errors,
                        s.corrupt,
                    )
                )
            return CacheStats(**self._count, tiers=tuple(tiers))

    def check_integrity(self) -> None:
        """Raise AssertionError unless every count and every index agrees."""
        with self._lock:
            self.host.check_integrity(dict(self._leases))
            for key in self._writing:
                assert self.host.state(key) == PageState.WRITING, "planned store not WRITING"
            for key in self._promoting:
                assert self.host.state(key) == PageState.WRITING, "promotion not WRITING"
            assert not (self._writing & self._promoting.keys()), "page written by two owners"
            for tier in self.tiers:
                tier.check_integrity()

    def pins(self) -> int:
        """Leases held right now (0 when the cache is idle)."""
        with self._lock:
            return sum(self._leases.values())

    def drain(self, timeout: float = 30.0) -> None:
        """Wait until no background work is in flight (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while True:
            self._sealer.flush(max(0.0, deadline - time.monotonic()))
            with self._lock:
                self._poll_locked()
                if not self._jobs and not self._sealer.busy():
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self._jobs)} tier jobs still in flight")
            time.sleep(0.002)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.drain()
        except TimeoutError as exc:
            log.warning("closing with work in flight: %s", exc)
        self._stop.set()
        if self._pump is not None:
            self._pump.join()
        self.publish_stats()
        self._sealer.close()
        for tier in self.tiers:
            tier.close()

    def __enter__(self) -> TieredCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
