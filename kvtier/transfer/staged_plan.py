"""Chunk planning of the staged DMA path (kvtier.transfer.staged): pure functions over page
counts, plane lists and slot numbers, so the addressing is testable without any device."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from kvtier.transfer import native


class Layout(NamedTuple):
    """Staging layout of one plane group: planes p0 .. p0 + span - 1 of each page, page images
    `stride` bytes apart; `runs` are the (first plane, plane count) runs of the group that are
    copied (consecutive planes merged). `gap` > 0 (whole pages only): images sit one host slot
    apart, so pages in consecutive slots move as one copy that carries the `gap` bytes between
    two payloads (a slot's padding and the next slot's header) along."""

    p0: int
    span: int
    stride: int
    runs: tuple[tuple[int, int], ...]
    gap: int = 0


def plane_runs(planes: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Consecutive planes merged: [0, 1, 4, 5, 6] -> ((0, 2), (4, 3))."""
    runs: list[tuple[int, int]] = []
    for p in planes:
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    return tuple(runs)


def group_layout(planes: Sequence[int], plane_bytes: int, slot_bytes: int = 0,
                 payload_bytes: int = 0) -> Layout:
    """The layout of `planes`. Given the pool's slot and payload sizes, a group covering whole
    payloads is laid out one slot per page image (see Layout.gap), where the gap is at most
    1/16 of a payload: one copy per run of consecutive slots instead of one per page, for a
    few percent more bytes at most."""
    runs = plane_runs(sorted(planes))
    p0 = runs[0][0]
    span = runs[-1][0] + runs[-1][1] - p0
    image = span * plane_bytes
    gap = slot_bytes - image
    if len(runs) == 1 and image == payload_bytes and gap > 0 and 16 * gap <= image:
        return Layout(p0, span, slot_bytes, runs, gap)
    return Layout(p0, span, image, runs)


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
    buffers: np.ndarray | None = None,
    host_base: int = 0,
) -> JobCopies:
    """copy_runs for every chunk of a job at once (chunk c = pages [c * pages_per_chunk, ...)):
    one vectorised pass instead of one per chunk, which the enqueue of a 1 GiB job repeats
    32 times. Copies never merge across chunks (the staging offset restarts at 0).
    With `buffers` (int64 [chunks]: the address of the buffer chunk c is staged in) and
    `host_base` (the pool's address), host and stage are absolute addresses, ready for the
    driver (a chunk's copies are then slices, with no per-chunk arithmetic)."""
    ppc = max(1, pages_per_chunk)
    if len(layout.runs) == 1:
        jc = _one_run_copies(slots, layout, plane_bytes, slot_bytes, payload_offset, ppc,
                             buffers, host_base)
        if jc is not None:
            return jc
    host, stage, size, first = _runs(slots, layout, plane_bytes, slot_bytes, payload_offset, ppc)
    n_chunks = -(-int(slots.size) // ppc)
    chunk_of = first // len(layout.runs) // ppc  # items are page-major, len(runs) per page
    bounds = np.searchsorted(chunk_of, np.arange(n_chunks + 1), side="left")
    if buffers is not None:
        stage = stage + buffers[chunk_of]
        host = host + host_base
    return JobCopies(host, stage, size, bounds)


def _one_run_copies(
    slots: np.ndarray,
    layout: Layout,
    plane_bytes: int,
    slot_bytes: int,
    payload_offset: int,
    ppc: int,
    buffers: np.ndarray | None,
    host_base: int,
) -> JobCopies | None:
    """job_copies for a layout of one plane run (every plane of a page, the common case) in one
    call of kvtier's native library (the plan is made before a job's first copy); None without
    the library (the general plan then runs). A page is one copy of its whole image here, so
    the bytes between two pages' staging copies are stride - image (none, or the layout's gap)
    and _runs' test reduces to: pages i - 1 and i of one chunk merge exactly when their slots
    are layout.stride / slot_bytes apart (1 for the layouts group_layout makes). At a chunk
    start the staging offset restarts, so nothing merges there."""
    if native.library() is None:
        return None
    (q, k), = layout.runs
    step, rem = divmod(layout.stride, slot_bytes)
    base = host_base if buffers is not None else 0
    bufs = None if buffers is None else np.ascontiguousarray(buffers, dtype=np.int64)
    return JobCopies(*native.plan_copies(
        np.ascontiguousarray(slots, dtype=np.int64).reshape(-1), slot_bytes,
        base + payload_offset + q * plane_bytes, layout.stride, (q - layout.p0) * plane_bytes,
        k * plane_bytes, ppc, step if rem == 0 else 0, bufs))


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
    s = slots.astype(np.int64, copy=False).reshape(-1)
    page = np.arange(s.size, dtype=np.int64)
    if pages_per_chunk is not None:
        page %= pages_per_chunk
    if len(layout.runs) == 1:  # the common case (every plane of a page): no 2-D broadcast
        (q, k), = layout.runs
        host = s * slot_bytes + (payload_offset + q * plane_bytes)
        stage = page * layout.stride + (q - layout.p0) * plane_bytes
        size = np.full(s.size, k * plane_bytes, dtype=np.int64)
    else:
        starts = np.array([q for q, _ in layout.runs], dtype=np.int64).reshape(1, -1)
        sizes = np.array([k for _, k in layout.runs], dtype=np.int64).reshape(1, -1)
        host = (s.reshape(-1, 1) * slot_bytes + payload_offset + starts * plane_bytes).reshape(-1)
        stage = (page.reshape(-1, 1) * layout.stride + (starts - layout.p0) * plane_bytes)
        stage = stage.reshape(-1)
        size = np.broadcast_to(sizes * plane_bytes, (s.size, sizes.shape[1])).reshape(-1)
    if host.size == 0:
        return host, stage, size.copy(), np.zeros(0, dtype=np.int64)
    # merged: adjacent on both sides, or (whole-page layouts) one slot gap apart on both
    dh = host[1:] - (host[:-1] + size[:-1])
    cont = np.zeros(host.size, dtype=bool)
    cont[1:] = (dh == stage[1:] - (stage[:-1] + size[:-1])) & ((dh == 0) | (dh == layout.gap))
    first = np.flatnonzero(~cont)
    last = np.append(first[1:], host.size) - 1
    merged = host[last] + size[last] - host[first]
    return host[first], stage[first], merged, first
