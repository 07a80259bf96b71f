"""A request's rows copied by this GPU's threads straight into a peer's KV tensors.

The peer's tensors are mapped into this process (kvtier.transfer.cuda_ipc); one launch of
kvtier.transfer.triton_kernels.copy_plane_rows_kernel per row size copies every plane's rows,
reading block ids from two small tables; a request shape seen before replays a captured CUDA
graph of the same upload and launches instead (one driver call of CPU). Writing from the SMs
over NVLink ran at 0.93-0.94 of a copy-engine peer copy on 2x H200 for contiguous and for
scattered 32 KiB rows alike, where the packed path (gather, one NIXL write per staging slot,
scatter) reached 0.51-0.57 of it and a direct NIXL write of 32 MiB descriptors 0.59-0.82
(bench/results/pd-h200x2-2026-11-22-run12.md).

`copy_rows_torch` does the same copy with torch indexing between torch tensors: the reference
the tests compare the kernel with, bit for bit.
"""

from __future__ import annotations

import ctypes
import itertools
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
import torch

from kvtier.geometry.groups import KVCacheSpec
from kvtier.transfer.cuda_ipc import upload
from kvtier.transfer.pack_plan import Plane, planes
from kvtier.transfer.pack_rows import plane_rows, widest
from kvtier.transfer.torch_path import move_dtype, widest_divisor

# Programs per SM and elements per step: the best of 1-16 programs and 4-16 KiB steps on
# 2x H200 (4 and 8 KiB: 366-367 GB/s against 356-365 elsewhere).
PROGRAMS_PER_SM = 4
_BLOCK_BYTES = 8192
_PLANS = 64  # request shapes whose plane tables are kept
_GRAPHS = 16  # captured copies kept (each holds a few KiB of tables, pinned and on the device)
_MIN_IDS = 256  # block ids per side a buffer holds at least (then powers of two)


class _Launch(NamedTuple):
    """One kernel launch: the planes whose rows are `row` elements. Counts are not part of it
    (they are in the uploaded table), so requests of other lengths can share a launch."""

    row: int
    block: int
    planes: int
    grid: int


class _Plan(NamedTuple):
    tables: np.ndarray  # every launch's table (max_rows, then a row per plane), launch order
    launches: tuple[_Launch, ...]
    nbytes: int
    ids: int  # block ids per side


class _Graph(NamedTuple):
    """The upload and the launches of one (ids capacity, launches) captured as a CUDA graph,
    with the buffers it reads: fill `host`, replay."""

    graph: Any  # torch.cuda.CUDAGraph
    host: np.ndarray  # view of a pinned buffer
    buffers: tuple[torch.Tensor, torch.Tensor]  # pinned host, device: kept alive with the graph


class DevicePointer:
    """A raw device address Triton accepts as a pointer argument (it reads data_ptr()/dtype):
    peer memory mapped through CUDA IPC has no torch tensor. Not a NamedTuple: Triton would
    take that for a tuple of arguments."""

    __slots__ = ("address", "dtype")

    def __init__(self, address: int, dtype: torch.dtype) -> None:
        self.address, self.dtype = address, dtype

    def data_ptr(self) -> int:
        return self.address


def _host_view(address: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    """CPU memory at `address` as a tensor (Triton's interpreter needs tensors)."""
    raw = (ctypes.c_ubyte * nbytes).from_address(address)
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype)


class PeerRows:
    """Copies requests' rows from `src` (this side's tensors) into the tensors at addresses
    `dst` (the peer's, mapped here; same spec, so same names and sizes). `copy` enqueues on the
    current stream of src's device and returns at once; the caller orders it after the stream
    that wrote the KV and waits for it before telling the peer. A copy first waits for the
    previous one's kernels (they read the tables it is about to overwrite).

    With `graphs` (CUDA only), a (ids capacity, launches) seen a second time is captured as a
    CUDA graph (the table upload and every launch) and replayed from then on: one driver call
    instead of a Python kernel launch per row size, which is most of a request's CPU time. The
    first time runs the launches directly, so one-off shapes never pay for a capture and every
    kernel is compiled before a capture needs it. A capture the driver refuses turns graphs
    off (`graph_error` says why) and the copy runs directly."""

    def __init__(self, spec: KVCacheSpec, src: Mapping[str, torch.Tensor],
                 dst: Mapping[str, int], kernels: ModuleType,
                 programs_per_sm: float | None = None, spread: bool = False,
                 graphs: bool = True) -> None:
        self.spec, self.kernels, self.spread = spec, kernels, spread
        self.programs = programs_per_sm or PROGRAMS_PER_SM
        self.device = next(iter(src.values())).device
        cuda = self.device.type == "cuda"
        self.sms = torch.cuda.get_device_properties(self.device).multi_processor_count \
            if cuda else 1
        sizes = {t.name: t.size_bytes for t in spec.tensors}
        self._src_addr = {k: int(v.data_ptr()) for k, v in src.items()}
        self._dst_addr = dict(dst)
        self._src_min, self._dst_min = min(self._src_addr.values()), min(self._dst_addr.values())
        vals = [*self._src_addr.values(), *self._dst_addr.values(),
                *(p.row_bytes for p in planes(spec, dict.fromkeys(range(len(spec.groups)), 1)))]
        e = widest_divisor(vals)
        self.elem, self.align = e, max(1, widest_divisor(vals, (16, 8, 4, 2)) // e)
        dtype = move_dtype(e)
        first = min(src.values(), key=lambda t: int(t.data_ptr())).reshape(-1).view(torch.uint8)
        self.src_base = first[: first.numel() // e * e].view(dtype)
        span = max(a + sizes[k] for k, a in self._dst_addr.items()) - self._dst_min
        self._host = self._dev = torch.empty(0, dtype=torch.int64)
        self._used = torch.cuda.Event() if cuda else None  # after the last copy's kernels
        self._plans: dict[tuple[tuple[int, int], ...], _Plan] = {}
        self.graphs, self.graph_error = graphs and cuda, ""
        self._graphs: dict[tuple[int, tuple[_Launch, ...]], _Graph | None] = {}  # None: seen
        self._capture_stream: torch.cuda.Stream | None = None
        self.dst_base: Any = DevicePointer(self._dst_min, dtype) if cuda \
            else _host_view(self._dst_min, span // e * e, dtype)

    @property
    def graphs_captured(self) -> int:
        return sum(g is not None for g in self._graphs.values())

    def _buffers(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Host and device buffers of at least n int64 for a direct copy, kept from one copy
        to the next (allocating and pinning per request cost more CPU than a few KiB are
        worth)."""
        if self._host.numel() < n:
            cap = 1 << max(12, (n - 1).bit_length())
            cuda = self.device.type == "cuda"
            self._host = torch.empty(cap, dtype=torch.int64, pin_memory=cuda)
            self._dev = torch.empty(cap, dtype=torch.int64, device=self.device) if cuda \
                else self._host
        return self._host, self._dev

    def _plan(self, key: tuple[tuple[int, int], ...]) -> _Plan:
        """The plane tables and launches of a request with (group, block count) `key`: they
        depend on the counts only, so repeated shapes reuse them (kept for _PLANS shapes)."""
        plan = self._plans.pop(key, None)
        if plan is None:
            counts = dict(key)
            at = dict(zip(counts, itertools.accumulate(counts.values(), initial=0)))
            by_row: dict[int, list[tuple[int, int, int, int]]] = {}
            nbytes = 0
            for p in planes(self.spec, counts):
                row = p.row_bytes // self.elem
                by_row.setdefault(row, []).append((
                    (self._src_addr[p.tensor] + p.offset - self._src_min) // self.elem,
                    (self._dst_addr[p.tensor] + p.offset - self._dst_min) // self.elem,
                    at[p.group], counts[p.group]))
                nbytes += p.row_bytes * counts[p.group]
            launches, tables = [], []
            for row, table in sorted(by_row.items()):
                block = min(_BLOCK_BYTES // self.elem, 1 << (row - 1).bit_length())
                max_rows = max(n for *_, n in table)
                tiles = len(table) * max_rows * -(-row // block)
                # a power of two: requests of nearby lengths share a launch (and a graph)
                grid = min(1 << (tiles - 1).bit_length(), int(self.sms * self.programs))
                launches.append(_Launch(row, block, len(table), max(1, grid)))
                tables.append(np.asarray([(max_rows, 0, 0, 0), *table], np.int64).reshape(-1))
            plan = _Plan(np.concatenate(tables) if tables else np.zeros(0, np.int64),
                         tuple(launches), nbytes, sum(counts.values()))
            if len(self._plans) >= _PLANS:
                self._plans.pop(next(iter(self._plans)))
        self._plans[key] = plan  # most recently used last
        return plan

    def _enqueue(self, host: torch.Tensor, dev: torch.Tensor, cap: int,
                 launches: Sequence[_Launch], size: int) -> None:
        """Upload host[:size] to dev and launch on the current stream; the tables start at
        2 * cap, after the source and destination ids."""
        if dev is not host:
            stream = torch.cuda.current_stream(self.device).cuda_stream
            upload(int(dev.data_ptr()), int(host.data_ptr()), size * 8, stream)
        s_dev, d_dev = dev[:cap], dev[cap : 2 * cap]
        at = 2 * cap
        for ln in launches:
            self.kernels.copy_plane_rows_kernel[(ln.grid,)](
                self.src_base, self.dst_base, dev[at : at + 4 * (ln.planes + 1)], s_dev, d_dev,
                ln.planes, ROW=ln.row, BLOCK=ln.block, ALIGN=self.align, SPREAD=self.spread,
                num_warps=4)
            at += 4 * (ln.planes + 1)

    def _graph(self, key: tuple[int, tuple[_Launch, ...]], size: int) -> _Graph | None:
        """The captured copy of `key`: None the first time it is seen (the caller launches
        directly), captured the second, kept for _GRAPHS keys. Only called when no copy is in
        flight (an evicted graph's buffers may be freed)."""
        if not self.graphs:
            return None
        if key not in self._graphs:
            if len(self._graphs) >= 4 * _GRAPHS:  # forget the oldest sighting or graph
                self._graphs.pop(next(iter(self._graphs)))
            self._graphs[key] = None
            return None
        got = self._graphs.pop(key)
        if got is None:
            got = self._capture(key[0], key[1], size)
            if got is None:
                return None
            kept = [k for k, g in self._graphs.items() if g is not None]
            if len(kept) >= _GRAPHS:
                self._graphs.pop(kept[0])
        self._graphs[key] = got  # most recently used last
        return got

    def _capture(self, cap: int, launches: tuple[_Launch, ...], size: int) -> _Graph | None:
        host = torch.zeros(size, dtype=torch.int64, pin_memory=True)
        dev = torch.zeros(size, dtype=torch.int64, device=self.device)
        graph = torch.cuda.CUDAGraph()
        if self._capture_stream is None:
            self._capture_stream = torch.cuda.Stream(self.device)
        try:
            with torch.cuda.stream(self._capture_stream):
                # thread-local: other threads' CUDA calls (NIXL's, the engine's) go on
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    self._enqueue(host, dev, cap, launches, size)
                finally:
                    graph.capture_end()
        except RuntimeError as exc:
            self.graphs, self.graph_error = False, f"CUDA graph capture failed: {exc}"
            return None
        return _Graph(graph, host.numpy(), (host, dev))

    def copy(self, src_ids: Mapping[int, Sequence[int]],
             dst_ids: Mapping[int, Sequence[int]]) -> int:
        """Enqueue the copy of blocks src_ids[g] into the peer's dst_ids[g] (checked by the
        caller: same groups, same counts, in range); return the bytes it moves."""
        groups = sorted(g for g, v in src_ids.items() if len(v))
        plan = self._plan(tuple((g, len(src_ids[g])) for g in groups))
        if not plan.launches:
            return 0
        n = plan.ids
        cap = max(_MIN_IDS, 1 << (n - 1).bit_length())
        size = 2 * cap + plan.tables.size
        if self._used is not None:  # the last copy's kernels may still read the buffers
            self._used.synchronize()
        graph = self._graph((cap, plan.launches), size)
        if graph is not None:
            h = graph.host
        else:
            host, dev = self._buffers(size)
            h = host.numpy()
        h[:n] = np.fromiter(itertools.chain.from_iterable(src_ids[g] for g in groups),
                            np.int64, n)
        h[cap : cap + n] = np.fromiter(
            itertools.chain.from_iterable(dst_ids[g] for g in groups), np.int64, n)
        h[2 * cap : size] = plan.tables
        if graph is not None:
            graph.graph.replay()
        else:
            self._enqueue(host, dev, cap, plan.launches, size)
        if self._used is not None:
            self._used.record(torch.cuda.current_stream(self.device))
        return plan.nbytes


def copy_rows_torch(spec: KVCacheSpec, src: Mapping[str, torch.Tensor],
                    dst: Mapping[str, torch.Tensor], src_ids: Mapping[int, Sequence[int]],
                    dst_ids: Mapping[int, Sequence[int]]) -> int:
    """The same copy between torch tensors with index_select / index_copy_ per plane."""
    counts = {g: len(v) for g, v in src_ids.items() if len(v)}
    nbytes = 0
    for p in planes(spec, counts):
        nbytes += _plane_copy(spec, p, src, dst, src_ids[p.group], dst_ids[p.group])
    return nbytes


def _plane_copy(spec: KVCacheSpec, p: Plane, src: Mapping[str, torch.Tensor],
                dst: Mapping[str, torch.Tensor], s: Sequence[int], d: Sequence[int]) -> int:
    a = plane_rows(src, p, spec.num_blocks)
    b = plane_rows(dst, p, spec.num_blocks)
    a, b = widest(a, b)
    si = torch.tensor(list(s), dtype=torch.long, device=a.device)
    di = torch.tensor(list(d), dtype=torch.long, device=b.device)
    rows = torch.index_select(a, 0, si)
    b.index_copy_(0, di, rows.to(b.device))
    return p.row_bytes * len(s)
