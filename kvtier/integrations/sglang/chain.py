"""Blocking batch I/O over an ordered chain of secondary tiers.

An engine whose own host pool is the primary tier (SGLang's HiCache) calls its storage backend
from background threads and expects each batch call to return when the pages are in place. The
secondary tiers are asynchronous (submit -> job id -> poll), so this module turns a batch into
"submit, wait for my job, report per key". Several engine threads (prefetch and write-back) may
wait at once: whoever polls a tier files every finished job under its id, so no thread can take
another's result.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from kvtier.keys import PageKey
from kvtier.tiers.base import Item, JobResult, Op, SecondaryTier

log = logging.getLogger("kvtier.integrations.sglang")


@dataclass(frozen=True)
class ChainTier:
    tier: SecondaryTier
    write_through: bool  # every stored page goes here too (the first tier always gets them)


class TierChain:
    """Ordered secondary tiers, first = fastest. Thread-safe.

    `load`/`store` block until the tier reports the job (or `timeout_s` passes; then the job is
    abandoned: its keys count as failed and its late result is dropped, and the caller must not
    reuse the buffers it handed in). Tier faults are failed keys, never exceptions.
    """

    def __init__(self, tiers: Sequence[ChainTier], *, timeout_s: float = 30.0) -> None:
        self.tiers = list(tiers)
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._done: list[dict[int, JobResult]] = [{} for _ in self.tiers]
        self._detached: list[set[int]] = [set() for _ in self.tiers]
        self.timeouts = 0
        self.detached_failures = 0

    def __len__(self) -> int:
        return len(self.tiers)

    # -- queries -------------------------------------------------------------------------------
    def locate(self, keys: Sequence[PageKey]) -> list[int | None]:
        """For each key, the index of the first tier holding it (None where no tier does)."""
        where: list[int | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        for t, ct in enumerate(self.tiers):
            if not todo:
                break
            flags = ct.tier.contains([keys[i] for i in todo])
            where_now = [i for i, f in zip(todo, flags) if f]
            for i in where_now:
                where[i] = t
            todo = [i for i, f in zip(todo, flags) if not f]
        return where

    def prefix_hits(self, keys: Sequence[PageKey]) -> int:
        """How many leading keys some tier holds (the consecutive-prefix count)."""
        where = self.locate(keys)
        return where.index(None) if None in where else len(where)

    # -- I/O -----------------------------------------------------------------------------------
    def load(self, t: int, items: Sequence[Item]) -> set[PageKey]:
        """Read blobs from tier `t` into the items' buffers; the keys that verified."""
        res = self._run(t, "load", items)
        return set(res.ok) if res is not None else set()

    def store(self, t: int, items: Sequence[Item]) -> set[PageKey]:
        res = self._run(t, "store", items)
        return set(res.ok) if res is not None else set()

    def store_detached(self, t: int, items: Sequence[Item]) -> bool:
        """Queue a store whose buffers the caller gives away; its result is only counted."""
        job = self.tiers[t].tier.submit_store(items)
        if job is None:
            return False
        with self._lock:
            self._detached[t].add(job)
        return True

    def _run(self, t: int, op: Op, items: Sequence[Item]) -> JobResult | None:
        if not items:
            return JobResult(0, op, (), (), 0.0)
        tier = self.tiers[t].tier
        deadline = time.monotonic() + self.timeout_s
        delay = 0.0002
        job = None
        while job is None:
            job = tier.submit_store(items) if op == "store" else tier.submit_load(items)
            if job is None:  # back-pressure: the tier has enough in flight
                if time.monotonic() > deadline:
                    return None
                self._collect(t)
                time.sleep(delay)
                delay = min(delay * 2, 0.005)
        delay = 0.0001
        while True:
            self._collect(t)
            with self._lock:
                res = self._done[t].pop(job, None)
            if res is not None:
                return res
            if time.monotonic() > deadline:
                with self._lock:
                    self._detached[t].add(job)
                    self.timeouts += 1
                log.warning("tier %s: %s of %d pages timed out", tier.name, op, len(items))
                return None
            time.sleep(delay)
            delay = min(delay * 2, 0.002)

    def _collect(self, t: int) -> None:
        results = self.tiers[t].tier.poll()
        if not results:
            return
        with self._lock:
            for r in results:
                if r.job_id in self._detached[t]:
                    self._detached[t].discard(r.job_id)
                    self.detached_failures += len(r.failed)
                else:
                    self._done[t][r.job_id] = r

    def drain(self, timeout_s: float = 10.0) -> None:
        """Wait (bounded) until no detached job is left (shutdown and tests)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for t in range(len(self.tiers)):
                self._collect(t)
            with self._lock:
                if not any(self._detached):
                    return
            time.sleep(0.001)

    def close(self) -> None:
        self.drain()
        for ct in self.tiers:
            try:
                ct.tier.close()
            except Exception as exc:  # closing must not raise into the engine's shutdown
                log.warning("tier %s: close failed: %s", ct.tier.name, exc)
