"""The CPU path: a page transfer as one pass of row copies, whatever the planes' layout.

Every plane is CPU memory and block `b` of plane `p` is a dense row at
`addr[p] + b * row_stride[p]`. One overlapping strided view over the address span of all planes,
whose row `r` starts `r` elements above the lowest plane, turns "block b of plane p" into a single
row number. A page blob is then one gather of `planes x blocks_per_page` rows straight into its
contiguous host slot (store) and one row assignment straight out of it (load): each byte is read
and written once. A per-plane gather into a temporary plus a scatter moved every byte three
times and ran at a third of memcpy speed for 4-8 KiB rows.

The rows move in kvtier's C row copier (kvtier.transfer.native: one call per thread over
the job's row addresses, prefetching ahead) where it is built, else as torch index_select
(stores) and numpy row assignment (loads) over that view.

The view never owns or touches memory outside the rows it is indexed with; block and slot
numbers are range-checked before use, so a bad index cannot reach a neighbouring allocation.
Results are bit-identical to kvtier.transfer.torch_path either way (tested).
"""

from __future__ import annotations

import ctypes
import itertools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from kvtier.transfer import native
from kvtier.transfer.device_kv import DeviceKV
from kvtier.transfer.torch_path import move_dtype, widest_divisor

# Jobs from this size on are split over at most this many threads (measured on 2 cores: loads
# 0.54 -> 0.70-0.80 of memcpy, stores 0.25-0.45 -> 0.35-0.62, interleaved A/B runs).
_THREAD_MIN_BYTES = 2 << 20
_MAX_THREADS = 4
# ATen's parallel grain (at::internal::GRAIN_SIZE, in elements). index_select hands more rows
# than grain/row_elems to an OpenMP team; called from our own copy threads that oversubscribes
# the cores (each copy thread opens a team of its own). In calls of at most that many rows
# 4 KiB-row stores went from 0.39-0.45 to 0.35-0.89 of memcpy (median 0.68), interleaved runs.
_ATEN_GRAIN = 32768
# The C copier writes a load's rows around the caches (its targets are scattered over the
# engine's tensors; 4 KiB-row loads 0.97-1.00 -> 1.11-1.12 of memcpy), a store's through them
# (no gain measured for the host slots' contiguous rows).
_NONTEMPORAL = {"store": False, "load": True}

def _runs(slots: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) index ranges of `slots` whose slots are consecutive ascending numbers."""
    if slots.size == 0:
        return []
    cut = np.flatnonzero(np.diff(slots) != 1) + 1
    edges = [0, *cut.tolist(), int(slots.size)]
    return list(itertools.pairwise(edges))


class RowCopier:
    """Copies pages between a CPU DeviceKV and host slot payloads, one row copy per block.

    Built once per (DeviceKV, host view) and reused; it holds the DeviceKV so the planes it
    addresses stay alive. Not thread-safe for concurrent calls that write the same memory (the
    engine runs CPU jobs one at a time)."""

    def __init__(self, dkv: DeviceKV, host: torch.Tensor) -> None:
        if dkv.device.type != "cpu" or host.device.type != "cpu":
            raise ValueError("RowCopier copies CPU memory only")
        self.dkv = dkv
        isz = dkv.geometry.itemsize
        addrs = dkv.plane_addrs()
        base = min(addrs)
        top = max(
            a + ((int(p.shape[0]) - 1) * p.stride(0) + dkv.block_elems) * isz
            for a, p in zip(addrs, dkv.planes)
        )
        strides = [s * isz for s in dkv.row_strides()]
        slot_addr, slot_stride = host.data_ptr(), host.stride(0) * host.element_size()
        self.elem = widest_divisor(
            [a - base for a in addrs] + strides + [dkv.block_bytes, slot_addr, slot_stride]
        )
        tdtype = move_dtype(self.elem)
        self.row_elems = dkv.block_bytes // self.elem
        span = (top - base) // self.elem
        raw = (ctypes.c_char * (span * self.elem)).from_address(base)
        # Row r = elements [r, r + row_elems) of the span: rows overlap, which is the point.
        shape = (span - self.row_elems + 1, self.row_elems)
        self._rows_t = torch.frombuffer(raw, dtype=tdtype).as_strided(shape, (1, 1))
        self._rows_np = self._rows_t.numpy()
        self._off = np.array([(a - base) // self.elem for a in addrs], dtype=np.int64)
        self._step = np.array([s // self.elem for s in strides], dtype=np.int64)
        self._limit = dkv.num_blocks
        n_planes, n = dkv.num_planes, dkv.blocks_per_page
        # Host payloads as [num_slots, planes * blocks_per_page, row_elems] in the wide dtype.
        self.host = host.view(torch.uint8).view(tdtype)
        self.host = self.host.view(host.shape[0], n_planes * n, self.row_elems)
        self._host_np = self.host.numpy()
        self._pool: ThreadPoolExecutor | None = None
        # the C copier's addressing: row r of the span at _span_addr + r * elem; row j of slot
        # s's payload at host address + s * slot stride + j * block bytes
        self._native = native.library() is not None
        self._span_addr = base
        self._slot_addr = self.host.data_ptr()
        self._slot_stride = self.host.stride(0) * self.elem
        self._row_cols = np.arange(n_planes * n, dtype=np.int64) * dkv.block_bytes

    def _row_ids(self, blocks: np.ndarray, planes: np.ndarray) -> np.ndarray:
        """[N, len(planes) * n] row numbers of every page's blocks, plane-major (blob order)."""
        if blocks.size and (int(blocks.min()) < 0 or int(blocks.max()) >= self._limit):
            raise ValueError(f"block out of range [0, {self._limit})")
        off, step = self._off[planes][None, :, None], self._step[planes][None, :, None]
        return (off + blocks[:, None, :] * step).reshape(blocks.shape[0], -1)

    def _check_slots(self, sl: np.ndarray) -> None:
        if sl.size and (int(sl.min()) < 0 or int(sl.max()) >= self.host.shape[0]):
            raise ValueError(f"slot out of range [0, {self.host.shape[0]})")

    def _copy_native(self, op: str, ids: np.ndarray, sl: np.ndarray, cols: np.ndarray) -> None:
        """Rows `ids` ([N, R] span rows) <-> row offsets `cols` ([R] bytes) of slots `sl`, one
        C call per thread (store: span -> slots)."""
        span = ids * self.elem + self._span_addr
        slot = (sl * self._slot_stride + self._slot_addr)[:, None] + cols[None, :]
        dst, src = (slot, span) if op == "store" else (span, slot)
        nt = _NONTEMPORAL[op]

        def part(lo: int, hi: int) -> None:
            native.copy_rows(dst[lo:hi].reshape(-1), src[lo:hi].reshape(-1),
                             self.dkv.block_bytes, nt)

        self._split(part, int(sl.size), ids.size * self.dkv.block_bytes)

    def store(self, blocks: torch.Tensor, slots: torch.Tensor) -> None:
        """Copy the pages made of `blocks` ([N, n]) into host slots `slots` ([N])."""
        if slots.numel() == 0:
            return
        blk = blocks.numpy().reshape(int(slots.numel()), -1)
        sl = slots.numpy().reshape(-1)
        self._check_slots(sl)
        ids_np = self._row_ids(blk, np.arange(self.dkv.num_planes))
        if self._native:
            self._copy_native("store", ids_np, sl, self._row_cols)
            return
        ids = torch.from_numpy(ids_np)
        want = (ids.shape[1], self.row_elems)
        if tuple(self.host.shape[1:]) != want:  # index_select would resize a wrong `out`
            raise RuntimeError(f"host slot view {tuple(self.host.shape[1:])} holds no {want}")

        rows = int(ids.shape[1])
        step = max(1, _ATEN_GRAIN // self.row_elems)
        cuts = [(a, min(a + step, rows)) for a in range(0, rows, step)]

        def part(lo: int, hi: int) -> None:
            # Per page (slot payloads are not adjacent: headers sit between them), in calls
            # small enough that ATen copies their rows serially on this thread.
            for i in range(lo, hi):
                idx, out = ids[i], self.host[int(sl[i])]
                for a, b in cuts:
                    torch.index_select(self._rows_t, 0, idx[a:b], out=out[a:b])

        self._split(part, int(sl.size), ids.numel() * self.dkv.block_bytes)

    def load(
        self, slots: torch.Tensor, blocks: torch.Tensor, planes: Sequence[int] | None = None
    ) -> None:
        """Copy host slots `slots` into the blocks `blocks`, only the given planes (default:
        every plane a load writes, see DeviceKV.write_planes)."""
        todo = np.array(self.dkv.write_planes() if planes is None else list(planes), np.int64)
        if slots.numel() == 0 or todo.size == 0:
            return
        blk = blocks.numpy().reshape(int(slots.numel()), -1)
        sl = slots.numpy().reshape(-1)
        self._check_slots(sl)
        ids = self._row_ids(blk, todo)
        n = self.dkv.blocks_per_page
        if self._native:
            cols = self._row_cols.reshape(-1, n)[todo].reshape(-1)
            self._copy_native("load", ids, sl, cols)
            return
        dense = bool(np.all(np.diff(todo) == 1))

        def part(a: int, b: int) -> None:
            for lo, hi in _runs(sl[a:b]):
                lo, hi = lo + a, hi + a
                first = int(sl[lo])
                src = self._host_np[first : first + hi - lo]
                if dense:
                    src = src[:, int(todo[0]) * n : (int(todo[-1]) + 1) * n]
                else:  # alias groups skip planes: pick the written ones (a small temporary)
                    src = src.reshape(hi - lo, -1, n, self.row_elems)[:, todo]
                self._rows_np[ids[lo:hi]] = src.reshape(hi - lo, -1, self.row_elems)

        self._split(part, int(sl.size), ids.size * self.dkv.block_bytes)

    def _split(self, part: Callable[[int, int], None], pages: int, nbytes: int) -> None:
        """Run part(lo, hi) over page ranges covering [0, pages), on several threads when the
        job is large: one core alone reaches about half of memcpy speed on scattered rows,
        and the C copier, index_select and the numpy row copies all release the GIL."""
        workers = min(_MAX_THREADS, torch.get_num_threads(), pages)
        if workers < 2 or nbytes < _THREAD_MIN_BYTES:
            part(0, pages)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(_MAX_THREADS - 1, thread_name_prefix="kvtier-rows")
        edges = [pages * w // workers for w in range(workers + 1)]
        futures = [self._pool.submit(part, lo, hi) for lo, hi in itertools.pairwise(edges[1:])]
        part(edges[0], edges[1])
        for f in futures:
            f.result()
