"""Measurements for `kvtier bench tiers`: each tier next to its raw client, in one run.

Every pass moves the same pages (sealed blobs in a host pool) and reports bytes per second of
wall time; the best of `repeat` passes counts. Disk reads start cold: the files are dropped from
the page cache (posix_fadvise DONTNEED, no root needed) before each read pass.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from kvtier.keys import write_header
from kvtier.memory.host_pool import HostPool
from kvtier.tiers.base import Item, ThreadedTier, TierContext

SEQ_CHUNK = 8 << 20


@dataclass(frozen=True)
class Row:
    tier: str
    op: str  # store | load
    pages: int
    blob_bytes: int
    tier_gbs: float
    raw_gbs: float  # the same store through its own client, same pages, same run
    raw_what: str
    seq_gbs: float | None = None  # disk only: sequential I/O of the same bytes
    verify_gbs: float | None = None  # loads: blob verification alone (the tier must do it)

    @property
    def ratio(self) -> float:
        return self.tier_gbs / self.raw_gbs if self.raw_gbs else 0.0

    @property
    def verified_raw_gbs(self) -> float | None:
        """Raw load followed by the blob check, one after the other: what a tier that
        verifies every page could reach without overlapping the two."""
        if not self.verify_gbs or self.op != "load":
            return None
        return 1 / (1 / self.raw_gbs + 1 / self.verify_gbs)

    @property
    def seq_ratio(self) -> float | None:
        return None if not self.seq_gbs else self.tier_gbs / self.seq_gbs


class Pages:
    """`n` sealed pages in slots [0, n) and n load targets in slots [n, 2n) of one pool."""

    def __init__(self, n: int, payload_bytes: int, fingerprint: bytes) -> None:
        self.n = n
        self.pool = HostPool(2 * n, payload_bytes, pin=False)
        self.ctx = TierContext(fingerprint, payload_bytes)
        self.keys = [os.urandom(16) for _ in range(n)]
        noise = os.urandom(payload_bytes)
        for i, key in enumerate(self.keys):
            payload = self.pool.blob(i)[64:]
            payload[:] = noise
            payload[:16] = key  # pages differ, so a mixed-up load fails its checksum
            write_header(self.pool.blob(i), fingerprint, key, payload_bytes, seal=True)

    @property
    def blob_bytes(self) -> int:
        return self.ctx.blob_bytes

    @property
    def total(self) -> int:
        return self.n * self.blob_bytes

    def sources(self) -> list[Item]:
        return [(k, self.pool.blob(i)) for i, k in enumerate(self.keys)]

    def targets(self) -> list[Item]:
        return [(k, self.pool.blob(self.n + i)) for i, k in enumerate(self.keys)]

    def check_loaded(self) -> None:
        for i in range(self.n):
            if bytes(self.pool.blob(self.n + i)) != bytes(self.pool.blob(i)):
                raise AssertionError(f"page {i} loaded wrong bytes")

    def scrub_targets(self) -> None:
        # numpy, not torch: torch's OpenMP workers keep spinning after a fill_ and take one of
        # a small machine's cores from the timed pass that follows (measured on 2 cores)
        self.pool.tensor[self.n :].numpy().fill(0)


def np_addr(buf: memoryview) -> int:
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


def batches(items: Sequence[Item], size: int) -> list[list[Item]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_gbs(nbytes: int, fn: Callable[[], object], repeat: int,
             before: Callable[[], None] | None = None) -> float:
    best = float("inf")
    for _ in range(repeat):
        if before is not None:
            before()
        best = min(best, timed(fn))
    return nbytes / best / 1e9


Pass = tuple[Callable[[], object], Callable[[], None] | None]  # (measured, untimed setup)


def interleaved(nbytes: int, repeat: int, passes: Sequence[Pass]) -> list[float]:
    """GB/s of each pass, best of `repeat`, running them in turn each round so that a busy
    neighbour or a warming cache affects the tier and its baseline alike."""
    best = [float("inf")] * len(passes)
    for _ in range(repeat):
        for i, (fn, before) in enumerate(passes):
            if before is not None:
                before()
            best[i] = min(best[i], timed(fn))
    return [nbytes / t / 1e9 for t in best]


def tier_pass(tier: ThreadedTier, op: str, items: Sequence[Item], batch: int) -> None:
    """Submit every batch (retrying on back-pressure), wait, and fail loudly on any failed key."""
    submit = tier.submit_store if op == "store" else tier.submit_load
    queue = batches(items, batch)
    failed = 0
    while queue:
        while queue and submit(queue[0]) is not None:
            queue.pop(0)
        for result in tier.poll():
            failed += len(result.failed)
        if queue:
            time.sleep(0.0002)  # back-pressure: wait for a slot
    for result in tier.wait_all(600):
        failed += len(result.failed)
    if failed:
        raise AssertionError(f"tier {tier.name}: {failed} of {len(items)} pages failed to {op}")


def drop_page_cache(paths: Sequence[str]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# -- raw disk ---------------------------------------------------------------------------------
def raw_slab_store(path: str, stride: int, items: Sequence[Item], batch: int = 0) -> None:
    """Each page written with os.pwrite at its slot offset in one slab file; with `batch`, an
    fdatasync after every `batch` pages (the raw equivalent of a flushing tier's jobs)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        for i, (_, buf) in enumerate(items):
            done = 0
            while done < len(buf):
                done += os.pwrite(fd, buf[done:], i * stride + done)
            if batch and (i + 1) % batch == 0:
                os.fdatasync(fd)
        if batch:
            os.fdatasync(fd)
    finally:
        os.close(fd)


def raw_slab_load(path: str, stride: int, items: Sequence[Item]) -> None:
    """Each page read with os.preadv from its slot offset in one slab file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        for i, (_, buf) in enumerate(items):
            if os.preadv(fd, [buf], i * stride) != len(buf):
                raise AssertionError("raw slab read came up short")
    finally:
        os.close(fd)


def seq_write(path: str, nbytes: int, chunk: memoryview) -> None:
    """dd-like: one file, large sequential writes, one fsync at the end."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, chunk[: min(left, len(chunk))])
        os.fsync(fd)
    finally:
        os.close(fd)


def seq_read(path: str, chunk: memoryview) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.readv(fd, [chunk]) > 0:
            pass
    finally:
        os.close(fd)
