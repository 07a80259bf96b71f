"""Background jobs of the cache: lower-tier I/O records and the sealer thread.

The sealer writes each page's header checksum once, off the engine's thread, then submits the
batch to the lower tiers. Pages are leased by the caller before they get here, so their slots
cannot be reused meanwhile, and a READY page's payload never changes.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from kvtier.keys import PageKey, write_header

if TYPE_CHECKING:
    from kvtier.cache.tiered import TieredCache


class JobKind(StrEnum):
    PROMOTE = "promote"  # lower tier -> host slot (holds the WRITING lease)
    CASCADE = "cascade"  # host slot -> write-through tier (holds a read lease)
    DEMOTE = "demote"  # evicted host slot -> demote tier (holds a read lease)


@dataclass(frozen=True)
class Job:
    kind: JobKind
    keys: tuple[PageKey, ...]


class Sealer:
    def __init__(self, cache: TieredCache) -> None:
        self._cache = cache
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-sealer")
        self._pending = 0
        self._cond = threading.Condition()

    def submit(self, kind: JobKind, keys: tuple[PageKey, ...], tiers: tuple[int, ...]) -> None:
        with self._cond:
            self._pending += 1
        self._pool.submit(self._run, kind, keys, tiers)

    def busy(self) -> bool:
        return self._pending > 0

    def flush(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._pending == 0, timeout)

    def _run(self, kind: JobKind, keys: tuple[PageKey, ...], tiers: tuple[int, ...]) -> None:
        try:
            self._seal_and_submit(kind, keys, tiers)
        finally:
            with self._cond:
                self._pending -= 1
                self._cond.notify_all()

    def _seal_and_submit(
        self, kind: JobKind, keys: tuple[PageKey, ...], tiers: tuple[int, ...]
    ) -> None:
        cache = self._cache
        pool = cache.host_pool
        fp = cache.namespace.fingerprint
        with cache._lock:
            slots = {k: cache.host.slot(k) for k in keys}
            unsealed = [k for k in keys if not cache.host.pages[k].sealed]
        for key in unsealed:
            write_header(pool.blob(slots[key]), fp, key, pool.payload_bytes, seal=True)
        # A write-through tier that already holds a page (another process stored it) is skipped.
        skip: dict[int, set[PageKey]] = {}
        if kind == JobKind.CASCADE:
            for ti in tiers:
                present = cache.tiers[ti].contains(keys)
                skip[ti] = {k for k, p in zip(keys, present) if p}
        with cache._lock:
            for key in unsealed:
                cache.host.pages[key].sealed = True
            for ti in tiers:
                todo = [k for k in keys if k not in skip.get(ti, ())]
                for key in keys:
                    if key in skip.get(ti, ()):
                        cache._release(key)
                if not todo:
                    continue
                tier = cache.tiers[ti]
                job_id = tier.submit_store([(k, pool.blob(slots[k])) for k in todo])
                if job_id is None:  # back-pressure: the page just doesn't reach this tier
                    for key in todo:
                        cache._release(key)
                    continue
                cache._jobs[(ti, job_id)] = Job(kind, tuple(todo))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
