"""Moving pages between the pool layouts of `kvtier.geometry.layouts` with torch.

Every function works on CPU and CUDA tensors alike: the work is a handful of tensor ops
(index_select / index_copy_ / permute), never a Python loop over elements. Data always moves on an
integer view of the same item size (uint8 / int16 / int32), so conversions are bit-exact for
every dtype (NaN payloads included) and fp8 works on CPU builds that cannot index float8.

A *pool* argument may be
  * the pool's logical six-axis tensor, `layouts.shape(layout, g, P)` (any strides), or
  * any contiguous tensor holding `P * g.page_elems` elements (flat, `[P, page_elems]`, ...), or
  * a contiguous uint8/int8 byte buffer of `P * g.page_bytes` bytes.
`P` is inferred from the element count. A six-axis tensor of the wrong shape is refused with
ValueError, since it almost always means the wrong layout was named. torch is imported lazily so
that `kvtier.geometry` itself stays importable without it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvtier.geometry.layouts import CANONICAL_LAYOUT, Layout, dims, parse_layout, shape
from kvtier.geometry.spec import KVGeometry, torch_dtype

if TYPE_CHECKING:
    import torch


def _move_dtype(itemsize: int) -> torch.dtype:
    import torch

    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[itemsize]


def _as_elems(t: torch.Tensor, g: KVGeometry) -> torch.Tensor:
    """`t` reinterpreted (no copy) in the integer movement dtype of g's item size."""
    import torch

    move = _move_dtype(g.itemsize)
    if t.element_size() == g.itemsize:
        return t if t.dtype == move else t.view(move)
    if t.dtype in (torch.uint8, torch.int8) and t.is_contiguous():
        if t.numel() % g.itemsize:
            raise ValueError(f"{t.numel()} bytes is not a whole number of {g.dtype} elements")
        return t.reshape(-1).view(move)
    raise ValueError(f"tensor of dtype {t.dtype} cannot hold {g.dtype} elements")


def _as_pool(pool: torch.Tensor, layout: Layout, g: KVGeometry) -> torch.Tensor:
    """The pool as its six-axis tensor in the movement dtype, sharing storage with `pool`."""
    t = _as_elems(pool, g)
    if t.numel() % g.page_elems:
        raise ValueError(f"pool of {t.numel()} elements is not a whole number of pages")
    want = shape(layout, g, t.numel() // g.page_elems)
    if tuple(t.shape) == want:
        return t
    if t.dim() == 6:
        raise ValueError(f"pool shape {tuple(t.shape)} is not the {layout.value} shape {want}")
    if not t.is_contiguous():
        raise ValueError("a pool not given in its six-axis shape must be contiguous")
    return t.view(want)


def _pages(
    pages: Sequence[int] | torch.Tensor, num_pages: int, device: torch.device, unique: bool = False
) -> torch.Tensor:
    """Page indices as an int64 tensor on `device`. Lists are range-checked (IndexError) and, for
    writes, checked for duplicates (ValueError); tensors are trusted, to avoid a device sync."""
    import torch

    if isinstance(pages, torch.Tensor):
        if pages.dim() != 1:
            raise ValueError(f"pages must be 1-D, got shape {tuple(pages.shape)}")
        return pages.to(device=device, dtype=torch.int64)
    pages = [int(p) for p in pages]
    for p in pages:
        if not 0 <= p < num_pages:
            raise IndexError(f"page {p} out of range [0, {num_pages})")
    if unique and len(set(pages)) != len(pages):
        raise ValueError("pages must not repeat when writing")
    return torch.tensor(pages, dtype=torch.int64, device=device)


def _order(frm: Layout, to: Layout) -> list[int]:
    """permute() argument taking a tensor in layout `frm` to the axis order of `to`."""
    names = dims(frm)
    return [names.index(n) for n in dims(to)]


def empty_pool(
    layout: Layout, g: KVGeometry, num_pages: int, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """An uninitialised six-axis pool of `num_pages` pages in `layout`, dtype from g."""
    import torch

    return torch.empty(
        shape(parse_layout(layout), g, num_pages), dtype=torch_dtype(g.dtype), device=device
    )


def to_canonical(
    pool: torch.Tensor,
    layout: Layout,
    g: KVGeometry,
    pages: Sequence[int] | torch.Tensor,
    *,
    layer: int | None = None,
) -> torch.Tensor:
    """Gather `pages` of `pool` into a new contiguous `[len(pages), g.page_elems]` tensor in
    PAGE_FIRST order (row i is the blob of pages[i]), dtype from g. With `layer`, only that layer:
    `[len(pages), g.layer_page_elems]`, i.e. `[kv][S][H][D]` per row. `pool` is not modified;
    the result is on the pool's device. Raises IndexError / ValueError on bad pages or shapes."""
    layout = parse_layout(layout)
    t = _as_pool(pool, layout, g)
    idx = _pages(pages, t.shape[dims(layout).index("P")], t.device)
    src = t.permute(_order(layout, CANONICAL_LAYOUT))  # [P][L][kv][S][H][D], a view
    if layer is not None:
        if not 0 <= layer < g.num_layers:
            raise IndexError(f"layer {layer} out of range [0, {g.num_layers})")
        src = src.narrow(1, layer, 1)
    per_page = math.prod(src.shape[1:])
    out = src.index_select(0, idx).contiguous()
    return out.view(idx.numel(), per_page).view(torch_dtype(g.dtype))


def from_canonical(
    blobs: torch.Tensor,
    pool: torch.Tensor,
    layout: Layout,
    g: KVGeometry,
    pages: Sequence[int] | torch.Tensor,
    *,
    layer: int | None = None,
) -> None:
    """Scatter PAGE_FIRST blobs into `pool` in place: row i of `blobs` becomes page pages[i].

    `blobs` holds `len(pages) * g.page_elems` elements (or bytes, as uint8) in any contiguous
    shape, or `len(pages) * g.layer_page_elems` with `layer`. Only the named pages (and layer) of
    `pool` change. `blobs` is copied to the pool's device if needed. Pages must not repeat (checked
    for lists; for tensors a repeat leaves either row, unspecified). Safe only while no one else
    reads or writes those pages of `pool`."""
    layout = parse_layout(layout)
    t = _as_pool(pool, layout, g)
    idx = _pages(pages, t.shape[dims(layout).index("P")], t.device, unique=True)
    dst = t.permute(_order(layout, CANONICAL_LAYOUT))
    if layer is not None:
        if not 0 <= layer < g.num_layers:
            raise IndexError(f"layer {layer} out of range [0, {g.num_layers})")
        dst = dst.narrow(1, layer, 1)
    src = _as_elems(blobs, g)
    row_shape = tuple(dst.shape[1:])
    if src.numel() != idx.numel() * math.prod(row_shape):
        raise ValueError(
            f"blobs hold {src.numel()} elements, expected {idx.numel()} pages of {row_shape}"
        )
    if not src.is_contiguous():
        src = src.contiguous()
    src = src.view((idx.numel(), *row_shape)).to(dst.device)
    dst.index_copy_(0, idx, src)


def convert(
    src: torch.Tensor, src_layout: Layout, dst_layout: Layout, g: KVGeometry
) -> torch.Tensor:
    """A new contiguous pool, `shape(dst_layout, g, P)`, holding every page of `src` (a pool in
    `src_layout`) in `dst_layout`; dtype from g, same device. `src` is not modified."""
    src_layout, dst_layout = parse_layout(src_layout), parse_layout(dst_layout)
    t = _as_pool(src, src_layout, g)
    return t.permute(_order(src_layout, dst_layout)).contiguous().view(torch_dtype(g.dtype))


def sliced_geometry(g: KVGeometry, heads: slice) -> KVGeometry:
    """The geometry of a reader that holds only `heads` of g's KV heads (a TP change)."""
    r = range(g.num_kv_heads)[heads]
    if r.step != 1 or len(r) == 0:
        raise ValueError(f"heads must be a non-empty slice with step 1, got {heads}")
    return dataclasses.replace(g, num_kv_heads=len(r))


def head_slice(
    blob_or_pool: torch.Tensor, layout: Layout, g: KVGeometry, heads: slice
) -> torch.Tensor:
    """A view of the KV heads `heads` (step 1) of every page of a pool (or of one page's blob,
    a pool with P = 1) in `layout`: six axes, H reduced to the slice, dtype from g.

    For PAGE_HEAD each page's slice is one contiguous run, and `.contiguous()` of the view is a
    PAGE_HEAD pool of `sliced_geometry(g, heads)`; other layouts give a strided view. No copy."""
    layout = parse_layout(layout)
    n = sliced_geometry(g, heads).num_kv_heads
    start = range(g.num_kv_heads)[heads].start
    t = _as_pool(blob_or_pool, layout, g)
    return t.narrow(dims(layout).index("H"), start, n).view(torch_dtype(g.dtype))
