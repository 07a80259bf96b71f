"""The secondary-tier contract, and a thread-pool base that most tiers build on.

A secondary tier stores sealed page blobs (header + payload, see kvtier.keys.blob) under their
page keys. It never touches the GPU: it reads from and writes into host-pool slots handed to it
by the cache, which keeps those slots pinned (reference-counted) until the job is reported done.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from kvtier.errors import BlobError
from kvtier.keys import PageKey, verify

log = logging.getLogger("kvtier.tiers")

Op = Literal["store", "load"]
Item = tuple[PageKey, memoryview]


@dataclass(frozen=True)
class TierContext:
    """What every tier needs to know about the pages it holds."""

    fingerprint: bytes  # namespace fingerprint every blob must carry
    payload_bytes: int  # payload length of every blob

    @property
    def blob_bytes(self) -> int:
        from kvtier.keys import HEADER_SIZE

        return HEADER_SIZE + self.payload_bytes


@dataclass(frozen=True)
class JobResult:
    """Outcome of one submitted batch, key by key. `failed` includes misses and corrupt blobs."""

    job_id: int
    op: Op
    ok: tuple[PageKey, ...]
    failed: tuple[PageKey, ...]
    seconds: float


@dataclass(frozen=True)
class TierStats:
    name: str
    pages: int
    used_bytes: int
    capacity_bytes: int | None
    stores_ok: int
    stores_failed: int
    loads_ok: int
    loads_failed: int
    corrupt: int
    errors: int
    rejected: int  # batches refused by back-pressure


class SecondaryTier(ABC):
    """A tier below host memory: local disk, Mooncake Store, Redis/Valkey, NIXL files.

    Contract:
    - submit_store / submit_load are non-blocking: they queue the batch and return a job id, or
      return None (queuing nothing) when the tier's in-flight limit is reached (back-pressure).
    - A store reads each item's buffer (a sealed blob) before its job is reported by poll(); a load
      writes the blob into each item's buffer and is reported ok only for keys whose blob
      verified (magic, version, namespace, key, length, checksum). A corrupt blob is a counted
      miss and is removed from the tier; it is never reported ok.
    - poll() returns each finished job exactly once. It never raises for tier faults: a dead
      server turns into failed keys, an error count, and one log line.
    - contains() answers from the tier (or a local index) without raising; on a fault it answers
      False for every key and counts the error.
    - Thread safety: all methods may be called from any thread.
    """

    name: str
    kind: str

    @abstractmethod
    def contains(self, keys: Sequence[PageKey]) -> list[bool]: ...

    @abstractmethod
    def submit_store(self, items: Sequence[Item]) -> int | None: ...

    @abstractmethod
    def submit_load(self, items: Sequence[Item]) -> int | None: ...

    @abstractmethod
    def poll(self) -> list[JobResult]: ...

    @abstractmethod
    def remove(self, keys: Sequence[PageKey]) -> None: ...

    def take_removed(self) -> list[PageKey]:
        """Keys the tier dropped on its own (its eviction, TTL, corruption) since the last call."""
        return []

    def inflight(self) -> int:
        return 0

    def register_host_memory(self, ptr: int, nbytes: int) -> None:
        """Called once per host pool before its slots are used, so a tier that moves bytes by
        address (RDMA, NIXL) can register the whole buffer once. Default: nothing to do."""
        return None

    @abstractmethod
    def stats(self) -> TierStats: ...

    @abstractmethod
    def check_integrity(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...


class ThreadedTier(SecondaryTier):
    """Runs blocking batch I/O on a small thread pool, verifies every loaded blob, bounds the
    number of jobs in flight, and turns exceptions into failed keys.

    Subclasses implement the blocking `_store_batch`, `_load_batch`, `_contains_batch` and
    `_remove_batch`; each returns one bool per item (or raises, failing the whole batch).

    Verification: `_load_verified` loads a batch and checks every page that arrived through
    `_verify_page`, the one blob check (kvtier.keys.verify). By default it runs `_load_batch`
    and then checks the pages in order. A tier whose I/O can overlap the check (verify page i
    while later pages are still arriving) overrides `_load_verified`; it still checks every
    page it reports ok through `_verify_page`, and returns the keys that failed, which `_run`
    counts, removes from the tier and reports as failed exactly as for any other tier.
    """

    def __init__(
        self, name: str, ctx: TierContext, *, threads: int = 2, max_inflight: int = 8
    ) -> None:
        self.name = name
        self.ctx = ctx
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"kvtier-{name}")
        self._max_inflight = max_inflight
        self._lock = threading.Lock()
        self._next_id = 1
        self._jobs: dict[int, Future[JobResult]] = {}
        self._counts = dict.fromkeys(
            (
                "stores_ok",
                "stores_failed",
                "loads_ok",
                "loads_failed",
                "corrupt",
                "errors",
                "rejected",
            ),
            0,
        )
        self._logged_fault = False
        self._removed: list[PageKey] = []

    # -- blocking primitives for subclasses ---------------------------------------------------
    @abstractmethod
    def _store_batch(self, items: Sequence[Item]) -> list[bool]: ...

    @abstractmethod
    def _load_batch(self, items: Sequence[Item]) -> list[bool]: ...

    @abstractmethod
    def _contains_batch(self, keys: Sequence[PageKey]) -> list[bool]: ...

    @abstractmethod
    def _remove_batch(self, keys: Sequence[PageKey]) -> None: ...

    # -- SecondaryTier -----------------------------------------------------------------------
    def contains(self, keys: Sequence[PageKey]) -> list[bool]:
        try:
            return self._contains_batch(keys)
        except Exception as exc:  # a tier fault is a miss, never a crash in the engine
            self._fault("contains", exc)
            return [False] * len(keys)

    def submit_store(self, items: Sequence[Item]) -> int | None:
        return self._submit("store", list(items))

    def submit_load(self, items: Sequence[Item]) -> int | None:
        return self._submit("load", list(items))

    def _submit(self, op: Op, items: list[Item]) -> int | None:
        with self._lock:
            if len(self._jobs) >= self._max_inflight:
                self._counts["rejected"] += 1
                return None
            job_id = self._next_id
            self._next_id += 1
            self._jobs[job_id] = self._pool.submit(self._run, job_id, op, items)
            return job_id

    def _verify_page(self, key: PageKey, buf: memoryview) -> bool:
        """The blob check of every loaded page: True if `buf` holds the sealed page of `key` in
        this tier's namespace; False (logged) if it does not, and the caller must report the
        key as corrupt (see `_load_verified`)."""
        try:
            verify(buf, self.ctx.fingerprint, key, self.ctx.payload_bytes)
        except BlobError as exc:
            log.warning("tier %s: dropping corrupt page %s: %s", self.name, key.hex(), exc)
            return False
        return True

    def _verify_loaded(self, items: Sequence[Item], flags: list[bool]) -> list[PageKey]:
        """Check every page flagged as arrived; clear the flag of each corrupt one and return
        their keys."""
        corrupt: list[PageKey] = []
        for i, (key, buf) in enumerate(items):
            if flags[i] and not self._verify_page(key, buf):
                flags[i] = False
                corrupt.append(key)
        return corrupt

    def _load_verified(self, items: Sequence[Item]) -> tuple[list[bool], list[PageKey]]:
        """Load `items` and verify them: (one flag per item, true only for a page that arrived
        and passed `_verify_page`; the keys of pages that arrived corrupt). Raising fails the
        whole batch. An override must not return while its I/O can still write into a slot."""
        flags = self._load_batch(items)
        return flags, self._verify_loaded(items, flags)

    def _run(self, job_id: int, op: Op, items: list[Item]) -> JobResult:
        start = time.perf_counter()
        corrupt: list[PageKey] = []
        try:
            if op == "store":
                flags = self._store_batch(items)
            else:
                flags, corrupt = self._load_verified(items)
        except Exception as exc:
            self._fault(op, exc)
            flags, corrupt = [False] * len(items), []
        ok: list[PageKey] = []
        failed: list[PageKey] = []
        for (key, _), good in zip(items, flags, strict=True):
            (ok if good else failed).append(key)
        if corrupt:
            try:
                self._remove_batch(corrupt)
            except Exception as exc:
                self._fault("remove", exc)
        with self._lock:
            self._counts["corrupt"] += len(corrupt)
            self._removed.extend(corrupt)
            self._counts[f"{op}s_ok"] += len(ok)
            self._counts[f"{op}s_failed"] += len(failed)
        return JobResult(job_id, op, tuple(ok), tuple(failed), time.perf_counter() - start)

    def poll(self) -> list[JobResult]:
        with self._lock:
            done = [jid for jid, fut in self._jobs.items() if fut.done()]
            futures = [self._jobs.pop(jid) for jid in done]
        return [f.result() for f in futures]

    def wait_all(self, timeout: float | None = None) -> list[JobResult]:
        """Block until every job in flight finishes; return them (tests and shutdown)."""
        with self._lock:
            futures = list(self._jobs.values())
        for f in futures:
            f.exception(timeout=timeout)
        return self.poll()

    def inflight(self) -> int:
        with self._lock:
            return len(self._jobs)

    def remove(self, keys: Sequence[PageKey]) -> None:
        try:
            self._remove_batch(keys)
        except Exception as exc:
            self._fault("remove", exc)

    def take_removed(self) -> list[PageKey]:
        with self._lock:
            out, self._removed = self._removed, []
            return out

    def _note_removed(self, keys: Sequence[PageKey]) -> None:
        with self._lock:
            self._removed.extend(keys)

    def _fault(self, what: str, exc: BaseException) -> None:
        with self._lock:
            self._counts["errors"] += 1
            first = not self._logged_fault
            self._logged_fault = True
        if first:  # logged once per tier; the count keeps going up in stats()
            log.warning("tier %s: %s failed (%s); treating as misses", self.name, what, exc)

    def _recovered(self) -> None:
        """Call after a successful operation so the next fault is logged again."""
        if self._logged_fault:
            with self._lock:
                self._logged_fault = False
            log.info("tier %s: recovered", self.name)

    def _stats(self, pages: int, used: int, capacity: int | None) -> TierStats:
        with self._lock:
            c = dict(self._counts)
        return TierStats(self.name, pages, used, capacity, **c)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
