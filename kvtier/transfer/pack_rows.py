"""The gathers and scatters of a packed transfer: one row-copy kernel launch per chunk.

A chunk (kvtier.transfer.pack_plan) is a list of pieces, "rows ids[lo:hi] of plane p at byte
`at` of the slot". Launching one index_select / index_copy_ per piece cost 0.15-0.3 ms of CPU
per chunk on 2x H200 (bench/results/pd-h200x2-2026-11-22-run3.md, run 5), and index_copy_ into
scattered rows was the slowest step of a request. `PackRows` turns each chunk's pieces into two
int64 tables (row offsets in the engine's memory, row offsets in the slot), built and uploaded
once, before the chunk first moves, and moves a chunk with one launch of
kvtier.transfer.triton_kernels.copy_rows_kernel per row size (one for most models).

Without Triton (or on a CPU without the interpreter) the same methods fall back to the
per-piece torch indexing, which the tests compare with the kernel bit for bit.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import NamedTuple

import numpy as np
import torch

from kvtier.transfer.pack_plan import Piece, Plane
from kvtier.transfer.torch_path import move_dtype, widest_divisor

# Elements per program step; 8 KiB of int64 keeps several 16-byte loads in flight per thread.
_BLOCK_BYTES = 8192
# Persistent grid: at most this many programs per SM. A gather or scatter that runs beside a
# NIXL write takes fewer, leaving HBM bandwidth to the copy engines that move the other chunk
# over NVLink (2x H200: 58-59% of peer copy at 2 per SM against 50-57% at 8, 49-55% at 1,
# bench/results/pd-h200x2-2026-11-22-run7.md); the first gather and the last scatter, which
# nothing overlaps, take the full grid.
PROGRAMS_PER_SM = 2
FULL_PROGRAMS_PER_SM = 8


def plane_rows(tensors: Mapping[str, torch.Tensor], p: Plane, num_blocks: int) -> torch.Tensor:
    flat = tensors[p.tensor].reshape(-1).view(torch.uint8)
    return flat[p.offset : p.offset + num_blocks * p.row_bytes].view(num_blocks, p.row_bytes)


def widest(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two [n, row] uint8 tables viewed as the widest integer type both allow: torch's
    index_select / index_copy_ move wide elements several times faster than bytes."""
    dtype = move_dtype(widest_divisor(int(v) for v in (a.shape[1], a.storage_offset(),
                                                       b.storage_offset())))
    return a.view(dtype), b.view(dtype)


def kernels_for(device: torch.device) -> ModuleType | None:
    """The Triton kernels module when they can run on `device` (CUDA, or CPU tensors under
    TRITON_INTERPRET=1), else None."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        from kvtier.transfer import triton_kernels
    except ImportError:
        return None
    return triton_kernels


class _Launch(NamedTuple):
    """Rows [lo, hi) of a chunk's tables, all `row` elements long."""

    row: int
    lo: int
    hi: int


def _expand(order: Sequence[Piece], all_ids: np.ndarray, id_at: np.ndarray,
            starts: np.ndarray, row: np.ndarray, elem: int) -> tuple[np.ndarray, np.ndarray]:
    """(plane offsets, slot offsets) in elements of every row of `order`'s pieces, in order:
    row i of a piece is block all_ids[id_at[plane] + lo + i] of its plane (`starts`, `row`:
    per plane, in elements), at `at + i * row` in the slot."""
    if not order:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    plane = np.fromiter((c.plane for c in order), np.int64, len(order))
    lo = np.fromiter((c.lo for c in order), np.int64, len(order)) + id_at[plane]
    count = np.fromiter((c.hi - c.lo for c in order), np.int64, len(order))
    at = np.fromiter((c.at // elem for c in order), np.int64, len(order))
    first = np.cumsum(count) - count  # table index of each piece's first row
    within = np.arange(int(count.sum()), dtype=np.int64) - np.repeat(first, count)
    row_of = np.repeat(row[plane], count)
    plane_off = np.repeat(starts[plane], count) + all_ids[np.repeat(lo, count) + within] * row_of
    slot_off = np.repeat(at, count) + within * row_of
    return plane_off, slot_off


def _upload(table: np.ndarray, dev: torch.device) -> torch.Tensor:
    """`table` on `dev`. On CUDA it goes through pinned memory without blocking the CPU: the
    copy is ordered on the current stream, before the kernels that read the table, and the
    pinned block is not reused before the copy has run (torch's host allocator records it)."""
    host = torch.from_numpy(table)
    if dev.type != "cuda":
        return host.to(dev)
    return host.pin_memory().to(dev, non_blocking=True)


class _Tables(NamedTuple):
    """One chunk's row offsets (engine memory, slot) on the device, and its launches."""

    plane_off: torch.Tensor
    slot_off: torch.Tensor
    launches: list[_Launch]


class PackRows:
    """One request's row tables. `ids[g]` are the request's block ids of group g on this side
    (CPU ints); `slot_base` is the staging buffer every slot lies in. A chunk's tables are
    built and uploaded on `stream` (default: the current stream) the first time it is moved,
    or ahead by `build()` (the receiver builds them all when a request is announced; the
    sender builds each just before its gather). gather/scatter enqueue on the current stream
    and return at once.
    `programs_per_sm` bounds the grid of gathers and scatters that run beside a write (None:
    PROGRAMS_PER_SM; at least one program in all)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], planes: Sequence[Plane],
                 chunks: Sequence[Sequence[Piece]], ids: Mapping[int, Sequence[int]],
                 num_blocks: int, slot_base: torch.Tensor,
                 kernels: ModuleType | None = None,
                 programs_per_sm: float | None = None,
                 stream: torch.cuda.Stream | None = None) -> None:
        self.tensors, self.planes, self.chunks = tensors, list(planes), chunks
        self.num_blocks = num_blocks
        self.programs_per_sm = programs_per_sm or PROGRAMS_PER_SM
        self.slot_base = slot_base
        self.kernels = kernels
        self.stream = stream
        dev = slot_base.device
        self.sms = torch.cuda.get_device_properties(dev).multi_processor_count \
            if dev.type == "cuda" else 1
        if kernels is not None:
            self._layout()
            # every group's ids in one array; id_at[p]: where plane p's group starts in it
            groups = sorted(ids)
            self._all_ids = np.asarray([b for g in groups for b in ids[g]], dtype=np.int64)
            at = dict(zip(groups, itertools.accumulate((len(ids[g]) for g in groups),
                                                       initial=0)))
            self._id_at = np.asarray([at.get(p.group, 0) for p in self.planes], dtype=np.int64)
            self._tables: list[_Tables | None] = [None] * len(chunks)
        else:
            self.ids = {g: torch.tensor(list(v), dtype=torch.long, device=dev)
                        for g, v in ids.items()}

    def _layout(self) -> None:
        # Offsets are counted from the lowest engine tensor, so none is negative (the Triton
        # interpreter adds them to unsigned addresses).
        first = min(self.tensors.values(), key=lambda t: int(t.data_ptr()))
        base = int(first.data_ptr())
        starts = [int(self.tensors[p.tensor].data_ptr()) + p.offset - base for p in self.planes]
        vals = [*starts, *(p.row_bytes for p in self.planes), base, self.slot_base.data_ptr()]
        e = widest_divisor(vals)
        self.elem, self.align = e, max(1, widest_divisor(vals, (16, 8, 4, 2)) // e)
        self._starts = np.asarray(starts, dtype=np.int64) // e
        self._row = np.asarray([p.row_bytes // e for p in self.planes], dtype=np.int64)
        flat = first.reshape(-1).view(torch.uint8)
        self.base = flat[: flat.numel() // e * e].view(move_dtype(e))
        slots = self.slot_base.view(torch.uint8)
        self.slots = slots[: slots.numel() // e * e].view(move_dtype(e))

    def build(self) -> None:
        """Build and upload the tables of every chunk not built yet."""
        if self.kernels is not None:
            for c in range(len(self.chunks)):
                self._chunk_tables(c)

    def _chunk_tables(self, c: int) -> _Tables:
        built = self._tables[c]
        if built is not None:
            return built
        # Table order: the chunk's pieces by row size (one launch per size). The Python loop
        # walks pieces only; their rows are expanded in one vectorised pass.
        order = sorted(self.chunks[c], key=lambda x: self.planes[x.plane].row_bytes)
        runs: list[_Launch] = []
        n = 0
        for piece in order:
            row, count = int(self._row[piece.plane]), piece.hi - piece.lo
            if runs and runs[-1].row == row:  # rows of one size: one launch
                runs[-1] = runs[-1]._replace(hi=n + count)
            else:
                runs.append(_Launch(row, n, n + count))
            n += count
        plane_off, slot_off = _expand(order, self._all_ids, self._id_at, self._starts,
                                      self._row, self.elem)
        dev = self.slot_base.device
        with torch.cuda.stream(self.stream) if self.stream is not None \
                else contextlib.nullcontext():
            built = _Tables(_upload(plane_off, dev), _upload(slot_off, dev), runs)
        self._tables[c] = built
        return built

    def gather(self, c: int, slot_at: int) -> None:
        """Copy chunk c's rows from the engine's tensors into the slot at byte `slot_at` of
        the staging buffer (chunk 0 on the full grid: no write runs beside it)."""
        if self.kernels is None:
            return self._torch(c, slot_at, to_slot=True)
        self._launch(c, slot_at, True, FULL_PROGRAMS_PER_SM if c == 0 else None)

    def scatter(self, c: int, slot_at: int) -> None:
        """Copy chunk c's rows from the slot at byte `slot_at` into the engine's tensors (the
        last chunk on the full grid)."""
        if self.kernels is None:
            return self._torch(c, slot_at, to_slot=False)
        last = c == len(self.chunks) - 1
        self._launch(c, slot_at, False, FULL_PROGRAMS_PER_SM if last else None)

    def _launch(self, c: int, slot_at: int, to_slot: bool, programs: float | None) -> None:
        assert self.kernels is not None
        tables = self._chunk_tables(c)
        shift = slot_at // self.elem
        if self.slot_base.device.type == "cuda":  # the tables live until this stream is done
            stream = torch.cuda.current_stream(self.slot_base.device)
            tables.plane_off.record_stream(stream)
            tables.slot_off.record_stream(stream)
        dev = self.slot_base.device
        with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
            self._launch_runs(tables, shift, to_slot, programs or self.programs_per_sm)

    def _launch_runs(self, tables: _Tables, shift: int, to_slot: bool, programs: float) -> None:
        assert self.kernels is not None
        for run in tables.launches:
            block = min(_BLOCK_BYTES // self.elem, 1 << (run.row - 1).bit_length())
            tiles = (run.hi - run.lo) * -(-run.row // block)
            grid = (max(1, min(tiles, int(self.sms * programs))),)
            po, so = tables.plane_off[run.lo : run.hi], tables.slot_off[run.lo : run.hi]
            if to_slot:
                args = (self.base, self.slots, po, so, 0, shift)
            else:
                args = (self.slots, self.base, so, po, shift, 0)
            self.kernels.copy_rows_kernel[grid](
                *args, run.hi - run.lo, ROW=run.row, BLOCK=block, ALIGN=self.align,
                num_warps=4)

    def _torch(self, c: int, slot_at: int, to_slot: bool) -> None:
        slot = self.slot_base.view(torch.uint8)[slot_at:]
        for piece in self.chunks[c]:
            p = self.planes[piece.plane]
            n = piece.hi - piece.lo
            part = slot[piece.at : piece.at + n * p.row_bytes].view(n, p.row_bytes)
            rows, part = widest(plane_rows(self.tensors, p, self.num_blocks), part)
            ids = self.ids[p.group][piece.lo : piece.hi]
            if to_slot:
                torch.index_select(rows, 0, ids, out=part)
            else:
                rows.index_copy_(0, ids, part)
