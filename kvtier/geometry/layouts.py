"""Memory layouts of a KV pool, and the index arithmetic over them.

A pool holds `P` pages of one geometry `g`. Its six logical axes are

    L   layer                       g.num_layers
    kv  K or V (one latent for MLA)  g.kv_factor (2, or 1 for MLA)
    P   page slot in the pool       num_pages
    S   token within the page       g.page_size
    H   KV head                     g.num_kv_heads (1 for MLA)
    D   element within the head     g.head_size (the latent width for MLA)

A layout is an order of these axes; the pool is dense and row-major in that order (the last axis
has stride 1). MLA keeps the `kv` axis with size 1, so every layout is always six-dimensional.

LAYER_FIRST        [L][kv][P][S][H][D]
    What an engine allocates on the GPU: one tensor per layer, `[kv][P][S][H][D]` (vLLM's
    `(2, num_blocks, block_size, H, D)`), the layers stacked. One page of one layer of K (or V)
    is one contiguous chunk of `g.chunk_bytes`; a whole page is `L * kv` chunks.

PAGE_FIRST         [P][L][kv][S][H][D]
    kvtier's canonical page blob: page `p` is the `g.page_bytes` contiguous bytes starting at
    `p * g.page_bytes`, and one layer of it (K then V) is `g.layer_page_bytes` contiguous bytes.
    Every tier below the GPU stores this byte string; `to_canonical` produces it.

PAGE_FIRST_DIRECT  [P][kv][L][S][H][D]
    SGLang's host layout `page_first_direct` is `(2, pages, L, page_size, H, D)`: for each of K
    and V, a page's layers follow each other, and each (page, layer) is a `[S][H][D]` chunk that
    is copied to or from a layer-first device chunk with one direct memcpy (no per-token gather,
    unlike SGLang's token-major `page_first`). SGLang keeps K and V in two separate halves of the
    pool, so one of its pages is two runs (its storage backends store `<key>_k` and `<key>_v`).
    kvtier moves `kv` just inside `P`: the page is one contiguous blob, its first half is SGLang's
    K run and its second half the V run byte for byte, and every (page, kv, layer) is still one
    `g.chunk_bytes` chunk. One layer of one page is therefore two chunks (K and V), not one.

PAGE_HEAD          [P][H][L][kv][S][D]
    Heads outermost inside the page, so that a reader with a different tensor-parallel size can
    take a contiguous range of heads of a page: heads `[h0, h1)` of page `p` are one run of
    `(h1 - h0) * L * kv * S * D` elements, and that run is itself a valid PAGE_HEAD page of the
    geometry with `h1 - h0` heads. SGLang's `page_head` is `(2, pages, H, page_size, L, D)`; it
    has the same "head range is contiguous" property per K/V half, but kvtier keeps the page
    contiguous (`P` outermost, `kv` inside) and orders `L` before `S` so that one layer of one
    head of a page (K then V) is one `kv * S * D` run, which per-layer loading needs.

All offsets here are in elements of `g.dtype` unless a name says bytes; all page indices count
from 0. Functions are pure; they never look at tensor contents.
"""

from __future__ import annotations

from enum import StrEnum

from kvtier.errors import ConfigError
from kvtier.geometry.spec import KVGeometry


class Layout(StrEnum):
    """How a KV pool orders its six axes (see the module docstring for the exact definitions)."""

    LAYER_FIRST = "layer_first"
    PAGE_FIRST = "page_first"
    PAGE_FIRST_DIRECT = "page_first_direct"
    PAGE_HEAD = "page_head"


_DIMS: dict[Layout, tuple[str, ...]] = {
    Layout.LAYER_FIRST: ("L", "kv", "P", "S", "H", "D"),
    Layout.PAGE_FIRST: ("P", "L", "kv", "S", "H", "D"),
    Layout.PAGE_FIRST_DIRECT: ("P", "kv", "L", "S", "H", "D"),
    Layout.PAGE_HEAD: ("P", "H", "L", "kv", "S", "D"),
}

# The canonical page-blob layout: the payload of every page blob below the GPU.
CANONICAL_LAYOUT = Layout.PAGE_FIRST


def parse_layout(name: str | Layout) -> Layout:
    """Return the Layout named `name` (its value, e.g. "page_first", or a Layout).

    Raises ConfigError("layout", name, [...]) for an unknown name.
    """
    if isinstance(name, Layout):
        return name
    try:
        return Layout(str(name).strip().lower().replace("-", "_"))
    except ValueError:
        raise ConfigError("layout", name, [m.value for m in Layout]) from None


def dims(layout: Layout) -> tuple[str, ...]:
    """Names of the pool's axes in memory order, outermost first: ("L","kv","P","S","H","D")..."""
    return _DIMS[parse_layout(layout)]


def _sizes(g: KVGeometry, num_pages: int) -> dict[str, int]:
    if not isinstance(num_pages, int) or isinstance(num_pages, bool) or num_pages < 0:
        raise ConfigError("num_pages", num_pages, "a non-negative integer")
    return {
        "L": g.num_layers,
        "kv": g.kv_factor,
        "P": num_pages,
        "S": g.page_size,
        "H": g.num_kv_heads,
        "D": g.head_size,
    }


def shape(layout: Layout, g: KVGeometry, num_pages: int) -> tuple[int, ...]:
    """Logical shape of a whole pool of `num_pages` pages in `layout` (always six axes)."""
    sizes = _sizes(g, num_pages)
    return tuple(sizes[d] for d in dims(layout))


def strides(layout: Layout, g: KVGeometry, num_pages: int) -> tuple[int, ...]:
    """Element strides of a dense (contiguous) pool of `shape(layout, g, num_pages)`."""
    out: list[int] = []
    step = 1
    for size in reversed(shape(layout, g, num_pages)):
        out.append(step)
        step *= size
    return tuple(reversed(out))


def pool_elems(g: KVGeometry, num_pages: int) -> int:
    """Elements in a pool of `num_pages` pages (the same for every layout)."""
    return num_pages * g.page_elems


def element_offset(
    layout: Layout,
    g: KVGeometry,
    num_pages: int,
    page: int,
    layer: int,
    kv: int,
    token: int,
    head: int,
) -> int:
    """Element index, in a dense flat pool, of element D=0 of (page, layer, kv, token, head).

    The head's `g.head_size` elements follow it contiguously in every layout. Raises IndexError
    when an index is out of range.
    """
    sizes = _sizes(g, num_pages)
    index = {"P": page, "L": layer, "kv": kv, "S": token, "H": head, "D": 0}
    for name, value in index.items():
        if not 0 <= value < sizes[name]:
            raise IndexError(f"{name} index {value} out of range [0, {sizes[name]})")
    layout = parse_layout(layout)
    return sum(index[d] * s for d, s in zip(dims(layout), strides(layout, g, num_pages)))


def _runs(
    layout: Layout, g: KVGeometry, num_pages: int, select: dict[str, range]
) -> list[tuple[int, int]]:
    """Byte runs covering the sub-box `select` (axis name -> index range; absent = whole axis).

    The box is dense from the innermost axis whose selection is partial inward; the axes outside
    it (each a range) are enumerated in memory order, so runs come sorted by offset. Adjacent
    runs are merged.
    """
    layout = parse_layout(layout)
    names = dims(layout)
    sizes = _sizes(g, num_pages)
    stride = dict(zip(names, strides(layout, g, num_pages)))
    ranges = [select.get(n, range(sizes[n])) for n in names]
    if any(len(r) == 0 for r in ranges):
        return []
    # Innermost axis that is not selected whole: everything inside it is one dense block.
    cut = 0
    for i, (n, r) in enumerate(zip(names, ranges)):
        if len(r) != sizes[n]:
            cut = i
    run_elems = len(ranges[cut]) * stride[names[cut]]
    starts = [ranges[cut].start * stride[names[cut]]]
    for i in range(cut - 1, -1, -1):
        s = stride[names[i]]
        starts = [base + j * s for j in ranges[i] for base in starts]
    item = g.itemsize
    merged: list[tuple[int, int]] = []
    for start in sorted(starts):
        off, nbytes = start * item, run_elems * item
        if merged and merged[-1][0] + merged[-1][1] == off:
            merged[-1] = (merged[-1][0], merged[-1][1] + nbytes)
        else:
            merged.append((off, nbytes))
    return merged


def _checked(name: str, value: int, size: int) -> range:
    if not 0 <= value < size:
        raise IndexError(f"{name} index {value} out of range [0, {size})")
    return range(value, value + 1)


def _head_range(g: KVGeometry, heads: slice) -> range:
    r = range(g.num_kv_heads)[heads]
    if r.step != 1 or len(r) == 0:
        raise ValueError(f"heads must be a non-empty slice with step 1, got {heads}")
    return r


def page_runs(
    layout: Layout,
    g: KVGeometry,
    num_pages: int,
    page: int,
    layer: int | None = None,
    *,
    heads: slice | None = None,
) -> list[tuple[int, int]]:
    """Contiguous (byte_offset, nbytes) runs of a dense pool that hold one page.

    With `layer`, only that layer of the page; with `heads` (a step-1 slice), only those KV heads.
    Runs are sorted by offset, never overlap, and adjacent runs are merged; their total is
    `g.page_bytes` (or `g.layer_page_bytes` with `layer`, scaled by the head fraction with
    `heads`). Raises IndexError for an out-of-range page or layer.
    """
    select = {"P": _checked("page", page, num_pages)}
    if layer is not None:
        select["L"] = _checked("layer", layer, g.num_layers)
    if heads is not None:
        select["H"] = _head_range(g, heads)
    return _runs(layout, g, num_pages, select)


def run_count(layout: Layout, g: KVGeometry, layer: bool = False) -> int:
    """How many runs one page (or one layer of a page) takes in a pool of many pages."""
    return len(page_runs(layout, g, 2, 0, 0 if layer else None))
