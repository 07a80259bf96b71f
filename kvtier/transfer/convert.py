"""Layout conversion of a whole pool on its device: any Layout to any Layout.

On a GPU one Triton kernel writes the destination densely, row by row, and reads each row from
wherever the source layout keeps it (rows of >= 64 contiguous elements: the head dimension, or a
power-of-two piece of it, is innermost in every layout, so reads stay coalesced). Elsewhere, or
with path="torch", `kvtier.geometry.layout_ops.convert` (a permute + contiguous) does the same
bit for bit.
"""

from __future__ import annotations

import torch

from kvtier.errors import ConfigError
from kvtier.geometry.layout_ops import convert as torch_convert
from kvtier.geometry.layouts import Layout, dims, parse_layout, shape, strides
from kvtier.geometry.spec import KVGeometry, torch_dtype
from kvtier.transfer.torch_path import move_dtype

CONVERT_PATHS = ("auto", "torch", "triton")
_ROWS_BYTES = 16384  # bytes per program: enough work per CTA to hide its start


def _row_split(d: int) -> int:
    """The largest power of two dividing d, capped at 256 (the kernel's row width)."""
    return min(d & -d, 256)


def convert_layout(
    src: torch.Tensor,
    src_layout: Layout | str,
    dst_layout: Layout | str,
    g: KVGeometry,
    *,
    out: torch.Tensor | None = None,
    path: str = "auto",
    triton_module: object | None = None,
) -> torch.Tensor:
    """A dense pool in `dst_layout` holding every page of `src` (a dense pool in `src_layout`,
    any shape with the right element count). `out` (dense, same element count) is written when
    given. Raises ConfigError for an unknown path and ValueError for mismatched sizes."""
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
    src_stride = dict(zip(dims(frm), strides(frm, g, pages)))
    size = dict(zip(dims(to), shape(to, g, pages)))
    outer = [n for n in dims(to) if n != "D"]  # D is innermost in every layout
    row = _row_split(g.head_size)
    sizes = [size[n] for n in outer] + [g.head_size // row]
    steps = [src_stride[n] for n in outer] + [row]
    n_rows = flat.numel() // row
    rows = max(1, min(_ROWS_BYTES // (row * g.itemsize), 1024))
    grid = (-(-n_rows // rows),)
    tk.permute_rows_kernel[grid](  # type: ignore[attr-defined]
        flat, dst, n_rows, *sizes[1:], *steps, ROW=row, ROWS=rows, num_warps=4
    )
    return out
