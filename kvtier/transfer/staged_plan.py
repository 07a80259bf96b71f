"""Chunk planning of the staged DMA path (kvtier.transfer.staged): pure functions over page
counts, plane lists and slot numbers, so the addressing is testable without any device."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class Layout(NamedTuple):
    """Staging layout of one plane group: planes p0 .. p0 + span - 1 of each page back to back
    (`stride` bytes per page image); `runs` are the (first plane, plane count) runs of the group
    that are copied (consecutive planes merged)."""

    p0: int
    span: int
    stride: int
    runs: tuple[tuple[int, int], ...]


def plane_runs(planes: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Consecutive planes merged: [0, 1, 4, 5, 6] -> ((0, 2), (4, 3))."""
    runs: list[tuple[int, int]] = []
    for p in planes:
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    return tuple(runs)


def group_layout(planes: Sequence[int], plane_bytes: int) -> Layout:
    runs = plane_runs(sorted(planes))
    p0 = runs[0][0]
    span = runs[-1][0] + runs[-1][1] - p0
    return Layout(p0, span, span * plane_bytes, runs)


def chunk_bounds(n_pages: int, pages_per_chunk: int) -> list[tuple[int, int]]:
    """[lo, hi) page ranges of at most pages_per_chunk pages covering 0 .. n_pages."""
    step = max(1, pages_per_chunk)
    return [(lo, min(lo + step, n_pages)) for lo in range(0, n_pages, step)]


class JobCopies(NamedTuple):
    """The host copies of a whole job: copy j moves size[j] bytes between host offset host[j]
    (of the pool tensor) and staging offset stage[j] (of its chunk's buffer); the copies of
    chunk c are [bounds[c], bounds[c + 1])."""

    host: np.ndarray
    stage: np.ndarray
    size: np.ndarray
    bounds: np.ndarray


def job_copies(
    slots: np.ndarray,
    layout: Layout,
    plane_bytes: int,
    slot_bytes: int,
    payload_offset: int,
    pages_per_chunk: int,
) -> JobCopies:
    """copy_runs for every chunk of a job at once (chunk c = pages [c * pages_per_chunk, ...)):
    one vectorised pass instead of one per chunk, which the enqueue of a 1 GiB job repeats
    32 times. Copies never merge across chunks (the staging offset restarts at 0)."""
    ppc = max(1, pages_per_chunk)
    host, stage, size, first = _runs(slots, layout, plane_bytes, slot_bytes, payload_offset, ppc)
    n_chunks = -(-int(slots.size) // ppc)
    chunk_of = first // len(layout.runs) // ppc  # items are page-major, len(runs) per page
    bounds = np.searchsorted(chunk_of, np.arange(n_chunks + 1), side="left")
    return JobCopies(host, stage, size, bounds)


def copy_runs(
    slots: np.ndarray,
    layout: Layout,
    plane_bytes: int,
    slot_bytes: int,
    payload_offset: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(host offsets, staging offsets, sizes) in bytes, relative to the pool tensor and to the
    staging buffer, of the copies of one chunk whose pages live in `slots` (page i of the chunk
    at staging offset i * layout.stride). Copies adjacent on both sides are merged."""
    return _runs(slots, layout, plane_bytes, slot_bytes, payload_offset, None)[:3]


def _runs(
    slots: np.ndarray,
    layout: Layout,
    plane_bytes: int,
    slot_bytes: int,
    payload_offset: int,
    pages_per_chunk: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """copy_runs plus the index of each merged copy's first item (page * len(runs) + run).
    With `pages_per_chunk`, `slots` is a whole job and page i sits at staging offset
    (i % pages_per_chunk) * layout.stride of its chunk's buffer."""
    s = slots.astype(np.int64).reshape(-1, 1)
    starts = np.array([q for q, _ in layout.runs], dtype=np.int64).reshape(1, -1)
    sizes = np.array([k for _, k in layout.runs], dtype=np.int64).reshape(1, -1) * plane_bytes
    host = s * slot_bytes + payload_offset + starts * plane_bytes
    page = np.arange(s.shape[0], dtype=np.int64).reshape(-1, 1)
    if pages_per_chunk is not None:
        page = page % pages_per_chunk
    stage = page * layout.stride + (starts - layout.p0) * plane_bytes
    host, stage = host.reshape(-1), stage.reshape(-1)
    size = np.broadcast_to(sizes, (s.shape[0], sizes.shape[1])).reshape(-1)
    if host.size == 0:
        return host, stage, size.copy(), np.zeros(0, dtype=np.int64)
    cont = np.zeros(host.size, dtype=bool)
    cont[1:] = (host[1:] == host[:-1] + size[:-1]) & (stage[1:] == stage[:-1] + size[:-1])
    first = np.flatnonzero(~cont)
    group = np.cumsum(~cont) - 1
    merged = np.bincount(group, weights=size, minlength=first.size).astype(np.int64)
    return host[first], stage[first], merged, first
