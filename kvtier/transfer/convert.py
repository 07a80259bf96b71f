"""Layout conversion of a whole pool on its device: any Layout to any Layout.

On a GPU one Triton kernel writes the destination densely and reads each piece from wherever the
source layout keeps it. The plan first merges axes: size-1 axes vanish, and two axes adjacent in
the destination merge when they are adjacent, in the same order, in the source too. What is left
is a short list of axes whose innermost one is a run contiguous on both sides: a whole
`[S][H][D]` chunk for layer_first <-> page_first (32 KiB for Llama-3-8B), one head row (`D`) for
page_first -> page_head, the whole pool when the layouts agree. The run is split into rows of a
power of two (up to one tile), and each program copies one tile of `_TILE_BYTES` made of whole
rows with 16-byte accesses; the index arithmetic is per row, not per element, so long runs cost
one division chain per tile. Elsewhere, or with path="torch",
`kvtier.geometry.layout_ops.convert` (a permute + contiguous) does the same bit for bit.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from kvtier.errors import ConfigError
from kvtier.geometry.layout_ops import convert as torch_convert
from kvtier.geometry.layouts import Layout, dims, parse_layout, shape, strides
from kvtier.geometry.spec import KVGeometry, torch_dtype
from kvtier.transfer.torch_path import move_dtype

CONVERT_PATHS = ("auto", "torch", "triton")
# Bytes per program: 8 KiB is four 16-byte accesses per thread of 4 warps, small enough for
# many programs per SM (bytes in flight), large enough that per-tile arithmetic is negligible.
_TILE_BYTES = 8192
_AXES = 6  # the kernel takes six (size, stride) pairs; unused ones are size 1


class ConvertPlan(NamedTuple):
    """One kernel launch: rows of `row` elements in destination order; row r splits into
    indices over `sizes` (outermost first, len 6) and is read at sum(index * src_step)."""

    sizes: tuple[int, ...]
    steps: tuple[int, ...]
    row: int
    rows_per_tile: int
    n_rows: int
    grid: int


def merged_axes(frm: Layout, to: Layout, g: KVGeometry, pages: int) -> list[tuple[int, int]]:
    """(size, source stride) of the destination's axes after merging, outermost first; the last
    one has stride 1 (a run contiguous in both layouts). Size-1 axes are dropped."""
    src_stride = dict(zip(dims(frm), strides(frm, g, pages)))
    size = dict(zip(dims(to), shape(to, g, pages)))
    axes = [(size[n], src_stride[n]) for n in dims(to) if size[n] > 1]
    merged: list[tuple[int, int]] = []
    for n, st in axes:
        if merged and merged[-1][1] == st * n:  # outer axis steps over exactly this one
            merged[-1] = (merged[-1][0] * n, st)
        else:
            merged.append((n, st))
    if not merged or merged[-1][1] != 1:
        merged.append((1, 1))  # only when every axis is size 1 (one element); D has stride 1
    return merged


@functools.lru_cache(maxsize=256)
def plan(frm: Layout, to: Layout, g: KVGeometry, pages: int, tile_bytes: int) -> ConvertPlan:
    """The launch of the conversion of a dense `pages`-page pool (cached: it is pure)."""
    axes = merged_axes(frm, to, g, pages)
    run = axes[-1][0]
    tile = max(1, tile_bytes // g.itemsize)
    row = min(run & -run, 1 << (tile.bit_length() - 1))  # power of two dividing the run
    outer = axes[:-1]
    if run > row:
        outer.append((run // row, row))
    if len(outer) > _AXES:  # cannot happen with six axes (at most 5 outer + 1 split)
        raise ValueError(f"conversion needs {len(outer)} axes, the kernel takes {_AXES}")
    outer = [(1, 0)] * (_AXES - len(outer)) + outer
    n_rows = pages * g.page_elems // row
    per_tile = max(1, tile // row)
    return ConvertPlan(
        sizes=tuple(n for n, _ in outer),
        steps=tuple(st for _, st in outer),
        row=row,
        rows_per_tile=per_tile,
        n_rows=n_rows,
        grid=-(-n_rows // per_tile),
    )


def convert_layout(
    src: torch.Tensor,
    src_layout: Layout | str,
    dst_layout: Layout | str,
    g: KVGeometry,
    *,
    out: torch.Tensor | None = None,
    path: str = "auto",
    triton_module: object | None = None,
    tile_bytes: int = _TILE_BYTES,
    num_warps: int = 4,
) -> torch.Tensor:
    """A dense pool in `dst_layout` holding every page of `src` (a dense pool in `src_layout`,
    any shape with the right element count). `out` (dense, same element count) is written when
    given. `tile_bytes` and `num_warps` are the Triton kernel's bytes and warps per program.
    Raises ConfigError for an unknown path and ValueError for mismatched sizes."""
    if path not in CONVERT_PATHS:
        raise ConfigError("convert.path", path, CONVERT_PATHS)
    frm, to = parse_layout(src_layout), parse_layout(dst_layout)
    tk = triton_module
    if tk is None and path != "torch" and src.device.type == "cuda":
        try:
            from kvtier.transfer import triton_kernels as tk
        except ImportError:
            tk = None
    if path == "triton" and tk is None:
        raise ConfigError("convert.path", path, "'torch' (triton is not available here)")
    if tk is None or path == "torch":
        res = torch_convert(src, frm, to, g)
        if out is None:
            return res
        out.view(-1).view(res.dtype).copy_(res.reshape(-1))
        return out
    if not src.is_contiguous():
        raise ValueError("the Triton conversion needs a dense source pool")
    move = move_dtype(g.itemsize)
    flat = src.reshape(-1).view(move)
    if flat.numel() % g.page_elems:
        raise ValueError(f"pool of {flat.numel()} elements is not a whole number of pages")
    pages = flat.numel() // g.page_elems
    if out is None:
        out = torch.empty(shape(to, g, pages), dtype=torch_dtype(g.dtype), device=src.device)
    dst = out.reshape(-1).view(move)
    if dst.numel() != flat.numel():
        raise ValueError(f"out holds {dst.numel()} elements, expected {flat.numel()}")
    if pages == 0:
        return out
    p = plan(frm, to, g, pages, int(tile_bytes))
    tk.permute_runs_kernel[(p.grid,)](  # type: ignore[attr-defined]
        flat,
        dst,
        p.n_rows,
        *p.sizes[1:],
        *p.steps,
        ROW=p.row,
        ROWS=p.rows_per_tile,
        EVEN=p.n_rows % p.rows_per_tile == 0,
        WIDE=p.n_rows + p.rows_per_tile >= 2**31,  # row numbers past int32
        num_warps=num_warps,
    )
    return out
