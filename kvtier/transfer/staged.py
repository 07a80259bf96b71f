"""The staged, pipelined DMA path of the copy engine (large jobs).

A job is cut into chunks of whole pages that fit one staging buffer on the job's device. For a
store, chunk i is gathered on the device (device -> device, a few TB/s) into staging buffer
i % B in canonical page-first order while the DMA stream copies chunk i - 1 from its buffer into
the pinned host slots (one copy per contiguous run); a load is the mirror (DMA host -> staging,
then a scatter kernel). The PCIe bytes move on the copy engines, not on SMs, and stores and loads
use separate DMA streams so both directions of the link run at once.

Ordering (GPU): the gather/scatter runs on the engine's store/load stream (`main`), the copies on
the direction's own DMA stream (kvtier.transfer.staging.Direction). Each stage waits on the
other's event for buffer b (`filled[b]`, `free[b]`) before touching b, so B buffers are B chunks
in flight. A store's group ends with `main` waiting for its last copy, so whatever `main` records
afterwards (the job's done event) covers every host byte.

The same code runs on CPU tensors with no streams: the copies are tensor copies and the gather /
scatter torch indexing, which is how the chunk planning is tested without a GPU.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch

from kvtier.memory.host_pool import HostPool
from kvtier.transfer.device_kv import DeviceKV
from kvtier.transfer.staged_plan import JobCopies, Layout, chunk_bounds, group_layout, job_copies
from kvtier.transfer.staging import Direction
from kvtier.transfer.torch_path import move_dtype

# kernel(to_staging, blocks_dev [pages * n] int64, page_off_dev [pages] int64 offsets of each
# page image in `base` (staging buffer, in the kernel's element type) in those elements,
# planes, base) enqueues the gather (True) or scatter (False) on the current stream.
Kernel = Callable[[bool, torch.Tensor, torch.Tensor, Sequence[int], torch.Tensor], None]
# copy(dsts, srcs, sizes, stream handle) enqueues byte copies between absolute addresses.
Copier = Callable[[np.ndarray, np.ndarray, np.ndarray, int], None]


class _Addresses(NamedTuple):
    """A job's host copies as the driver takes them: copy j moves size[j] bytes from src[j]
    to dst[j] (uint64 addresses); chunk c's copies are [bounds[c], bounds[c + 1])."""

    dst: np.ndarray
    src: np.ndarray
    size: np.ndarray
    bounds: list[int]


class _Run(NamedTuple):
    """What every chunk of one job group shares."""

    op: str
    d: Direction
    main: torch.cuda.Stream | None
    planes: Sequence[int]
    lay: Layout
    addr: _Addresses | None


class StagedPath:
    """Chunked gather + DMA (store) / DMA + scatter (load) for one (DeviceKV, HostPool) pair.

    `chunk_bytes`: staging buffer size (raised to one page image when smaller), `buffers`:
    buffers per direction (>= 2 for overlap). `kernel` does gather/scatter (None: torch
    indexing); `copier` the host copies (None: tensor copies on the current stream). Not safe to
    call from several threads for one direction at once except through `run` (it locks)."""

    def __init__(
        self,
        dkv: DeviceKV,
        pool: HostPool,
        chunk_bytes: int,
        buffers: int,
        kernel: Kernel | None = None,
        copier: Copier | None = None,
        kernel_elem: int | None = None,
    ) -> None:
        self.dkv = dkv
        self.pool = pool
        self.chunk_bytes = max(int(chunk_bytes), dkv.geometry.page_bytes)
        self.num_buffers = max(1, int(buffers))
        self.kernel = kernel
        self.copier = copier
        self.on_gpu = dkv.device.type == "cuda"
        self.elem = move_dtype(dkv.geometry.itemsize)
        self.plane_bytes = dkv.blocks_per_page * dkv.block_bytes
        # offsets handed to the kernel are in its element size (bytes)
        self.unit = kernel_elem or dkv.geometry.itemsize
        self._dirs: dict[str, Direction] = {}
        self._make_lock = threading.Lock()
        self._page_off: dict[tuple[int, int, int], torch.Tensor] = {}
        self._layouts: dict[tuple[int, ...], Layout] = {}
        self._host_u8 = pool.tensor.view(-1)

    def _direction(self, op: str) -> Direction:
        with self._make_lock:
            d = self._dirs.get(op)
            if d is None:
                d = Direction.make(self.dkv.device, self.chunk_bytes, self.num_buffers,
                                   self.unit)
                self._dirs[op] = d
            return d

    def staging_bytes(self) -> int:
        """Bytes of staging memory allocated so far (both directions)."""
        return sum(d.buffers.numel() * d.buffers.element_size() for d in self._dirs.values())

    def layout(self, planes: Sequence[int]) -> Layout:
        """Staging layout of `planes`: whole pages one host slot apart (Layout.gap) where a
        chunk holds two slots or more (copies never merge across chunks). Cached per plane
        list (a job's groups repeat)."""
        key = tuple(planes)
        lay = self._layouts.get(key)
        if lay is None:
            if self.chunk_bytes < 2 * self.pool.slot_bytes:
                lay = group_layout(key, self.plane_bytes)
            else:
                lay = group_layout(key, self.plane_bytes, self.pool.slot_bytes,
                                   self.pool.payload_bytes)
            self._layouts[key] = lay
        return lay

    def pages_per_chunk(self, planes: Sequence[int]) -> int:
        return self.chunk_bytes // self.layout(planes).stride

    def _offsets(self, pages: int, stride: int, p0: int) -> torch.Tensor:  # cached per shape
        """Element offset of each page image in a buffer, shifted so that plane p sits at
        offset + p * plane_elems (the copy kernel's addressing) for p >= p0."""
        u = self.unit
        key = (pages, stride, p0)
        t = self._page_off.get(key)
        if t is None:
            base = torch.arange(pages, dtype=torch.int64) * (stride // u)
            t = (base - p0 * (self.plane_bytes // u)).to(self.dkv.device)
            self._page_off[key] = t
        return t

    # -- one stage ---------------------------------------------------------------------------
    def _device_copy(
        self,
        to_staging: bool,
        blocks: torch.Tensor,
        buf: torch.Tensor,
        planes: Sequence[int],
        lay: Layout,
        kbuf: torch.Tensor,
    ) -> None:
        """Gather (to_staging) or scatter the chunk's pages between the planes and `buf`
        (`kbuf`: the same buffer in the kernel's element type)."""
        pages = blocks.numel() // self.dkv.blocks_per_page
        if self.kernel is not None:
            off = self._offsets(pages, lay.stride, lay.p0)
            self.kernel(to_staging, blocks, off, planes, kbuf)
            return
        n, be = self.dkv.blocks_per_page, self.dkv.block_elems
        image = lay.span * self.plane_bytes
        view = buf[: pages * lay.stride].view(pages, lay.stride)[:, :image].view(self.elem)
        view = view.view(pages, lay.span, n, be)
        for p in planes:
            plane = self.dkv.planes[p].view(self.elem)
            rows = view[:, p - lay.p0]  # [pages, n, be], a strided view into the buffer
            if to_staging:
                rows.copy_(plane.index_select(0, blocks).view(pages, n, be))
            else:
                plane.index_copy_(0, blocks, rows.reshape(pages * n, be))

    def _host_copy(
        self,
        to_host: bool,
        copies: JobCopies,
        c: int,
        buf: torch.Tensor,
        stream: torch.cuda.Stream | None,
    ) -> None:
        """Chunk c's host copies between the pool and `buf` as tensor copies on `stream` (None:
        the current one): the path without a driver copier (CPU tensors, no libcuda)."""
        lo, hi = int(copies.bounds[c]), int(copies.bounds[c + 1])
        host, stage, size = copies.host[lo:hi], copies.stage[lo:hi], copies.size[lo:hi]
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for h_off, s_off, n in zip(host.tolist(), stage.tolist(), size.tolist()):
                hv, sv = self._host_u8[h_off : h_off + n], buf[s_off : s_off + n]
                if to_host:
                    hv.copy_(sv, non_blocking=True)
                else:
                    sv.copy_(hv, non_blocking=True)

    # -- a job group -------------------------------------------------------------------------
    def run(
        self,
        op: str,
        blocks: torch.Tensor,
        slots: torch.Tensor,
        planes: Sequence[int],
        blocks_dev: torch.Tensor | None = None,
        main: torch.cuda.Stream | None = None,
    ) -> torch.Tensor | None:
        """Enqueue `op` ("store"/"load") of pages (blocks [N, n] int64 CPU, slots [N] CPU) for
        `planes`, with gather/scatter on `main` (GPU; None: the current stream, which must be
        `main` when given: the kernels launch on the current stream). `blocks_dev`: the same
        blocks already on the device (a job uploads them once); without it they are uploaded
        here, for a load after its first copy is on its way. Returns the blocks as the
        gather/scatter read them (None: nothing enqueued): pass them to the job's next group,
        and keep them alive until `main` has passed this point. Raises whatever a copy
        raises."""
        if not planes or slots.numel() == 0:
            return None
        d = self._direction(op)
        lay = self.layout(planes)
        n = self.dkv.blocks_per_page
        ppc = self.chunk_bytes // lay.stride
        if self.on_gpu and main is None:
            main = torch.cuda.current_stream(self.dkv.device)
        flat = None if blocks_dev is None else blocks_dev.reshape(-1)
        if flat is None and op == "store":
            flat = self._upload(blocks)
        with d.lock:
            bufs = None
            if self.copier is not None:  # absolute addresses, chunk c in buffer (next + c) % B
                chunks = -(-int(slots.numel()) // ppc)
                bufs = d.addrs.take(np.arange(d.next_buf, d.next_buf + chunks), mode="wrap")
            jc = job_copies(slots.numpy(), lay, self.plane_bytes, self.pool.slot_bytes,
                            self.pool.payload_offset, ppc, bufs, self._host_u8.data_ptr())
            run = _Run(op, d, main, planes, lay, None)
            if d.stream is not None and main is not None and d.begin is not None:
                d.begin.record(main)
                d.stream.wait_event(d.begin)  # no copy of this job runs before main's earlier work
            if bufs is not None:
                host, stage = jc.host.view(np.uint64), jc.stage.view(np.uint64)
                dst, src = (host, stage) if op == "store" else (stage, host)
                run = run._replace(addr=_Addresses(dst, src, jc.size.view(np.uint64),
                                                   jc.bounds.tolist()))
            for c, (lo, hi) in enumerate(chunk_bounds(int(slots.numel()), ppc)):
                b = d.next_buf
                d.next_buf = (b + 1) % self.num_buffers
                if op == "store":
                    assert flat is not None
                    self._stage_store(run, b, flat[lo * n : hi * n], jc, c)
                    continue
                self._load_copy(run, b, jc, c)
                if flat is None:  # the block ids go up while the first chunk's copy runs
                    flat = self._upload(blocks)
                self._load_scatter(run, b, flat[lo * n : hi * n])
            if d.stream is not None and main is not None and op == "store" and d.end is not None:
                d.end.record(d.stream)
                main.wait_event(d.end)
        return flat

    def _upload(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.reshape(-1).to(self.dkv.device, non_blocking=True)

    def _move(self, run: _Run, b: int, jc: JobCopies, c: int, stream: torch.cuda.Stream | None
              ) -> None:
        """Chunk c's host copies, on `stream` (None: the current one)."""
        if run.addr is None:
            self._host_copy(run.op == "store", jc, c, run.d.views[b], stream)
            return
        lo, hi = run.addr.bounds[c], run.addr.bounds[c + 1]
        on = stream if stream is not None else run.main
        assert self.copier is not None and on is not None
        self.copier(run.addr.dst[lo:hi], run.addr.src[lo:hi], run.addr.size[lo:hi], on.cuda_stream)

    def _stage_store(self, run: _Run, b: int, blk: torch.Tensor, jc: JobCopies, c: int) -> None:
        d, main = run.d, run.main
        if d.stream is None or main is None:
            self._device_copy(True, blk, d.views[b], run.planes, run.lay, d.kviews[b])
            self._move(run, b, jc, c, None)
            return
        main.wait_event(d.free[b])  # the previous DMA out of buffer b has finished
        self._device_copy(True, blk, d.views[b], run.planes, run.lay, d.kviews[b])
        d.filled[b].record(main)
        d.stream.wait_event(d.filled[b])
        self._move(run, b, jc, c, d.stream)
        d.free[b].record(d.stream)

    def _load_copy(self, run: _Run, b: int, jc: JobCopies, c: int) -> None:
        """Chunk c of a load, host -> staging buffer b (its DMA half)."""
        d = run.d
        if d.stream is None or run.main is None:
            self._move(run, b, jc, c, None)
            return
        d.stream.wait_event(d.free[b])  # the previous scatter out of buffer b has finished
        self._move(run, b, jc, c, d.stream)
        d.filled[b].record(d.stream)

    def _load_scatter(self, run: _Run, b: int, blk: torch.Tensor) -> None:
        """A load's chunk, staging buffer b -> the blocks `blk` (its device half)."""
        d, main = run.d, run.main
        if d.stream is not None and main is not None:
            main.wait_event(d.filled[b])
        self._device_copy(False, blk, d.views[b], run.planes, run.lay, d.kviews[b])
        if d.stream is not None and main is not None:
            d.free[b].record(main)
