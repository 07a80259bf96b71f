"""Property tests of the pool layouts: bit-exact round trips, offsets, byte runs, head slices."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.geometry import (
    KVGeometry,
    Layout,
    convert,
    dims,
    element_offset,
    from_canonical,
    head_slice,
    page_runs,
    shape,
    sliced_geometry,
    to_canonical,
    torch_dtype,
)

DTYPES = ["bfloat16", "float16", "float32", "float8_e4m3fn"]
LAYOUTS = list(Layout)
INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


@st.composite
def geometries(draw: st.DrawFn) -> KVGeometry:
    mla = draw(st.booleans())
    return KVGeometry(
        num_layers=draw(st.sampled_from([1, 2, 3, 5])),
        num_kv_heads=1 if mla else draw(st.sampled_from([1, 2, 3, 5])),
        head_size=draw(st.sampled_from([1, 2, 3, 8])),
        page_size=draw(st.sampled_from([1, 3, 7, 16])),
        dtype=draw(st.sampled_from(DTYPES)),
        mla=mla,
    )


def random_pool(g: KVGeometry, layout: Layout, num_pages: int, seed: int) -> torch.Tensor:
    """A six-axis pool of random bits (NaN and inf patterns included) in g's dtype."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (num_pages * g.page_bytes,), dtype=torch.uint8, generator=gen)
    return raw.view(torch_dtype(g.dtype)).view(shape(layout, g, num_pages))


def raw(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers: comparing these is bit-exact, unlike float ==."""
    return t.contiguous().view(INT_VIEW[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(raw(a), raw(b))


def canonical_index(layout: Layout, g: KVGeometry, num_pages: int, page: int) -> torch.Tensor:
    """Flat element indices of one page in PAGE_FIRST order, from element_offset alone."""
    starts = [
        element_offset(layout, g, num_pages, page, layer, kv, token, head)
        for layer, kv, token, head in itertools.product(
            range(g.num_layers), range(g.kv_factor), range(g.page_size), range(g.num_kv_heads)
        )
    ]
    return (torch.tensor(starts)[:, None] + torch.arange(g.head_size)[None, :]).reshape(-1)


@settings(max_examples=60, deadline=None)
@given(g=geometries(), num_pages=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_every_pair_of_layouts_round_trips_bit_exactly(
    g: KVGeometry, num_pages: int, seed: int
) -> None:
    pools: dict[Layout, torch.Tensor] = {}
    base = random_pool(g, Layout.PAGE_FIRST, num_pages, seed)
    everything = list(range(num_pages))
    canon = to_canonical(base, Layout.PAGE_FIRST, g, everything)
    for lay in LAYOUTS:
        pools[lay] = convert(base, Layout.PAGE_FIRST, lay, g)
        assert pools[lay].shape == shape(lay, g, num_pages)
        assert pools[lay].dtype == torch_dtype(g.dtype)
        # The content of every page is the same whichever layout holds it.
        assert same_bits(to_canonical(pools[lay], lay, g, everything), canon)
    for src, dst in itertools.product(LAYOUTS, LAYOUTS):
        there = convert(pools[src], src, dst, g)
        assert same_bits(there, pools[dst]), (src, dst)
        back = convert(there, dst, src, g)
        assert same_bits(back, pools[src]), (src, dst)


@settings(max_examples=60, deadline=None)
@given(
    g=geometries(),
    layout=st.sampled_from(LAYOUTS),
    num_pages=st.integers(1, 6),
    data=st.data(),
)
def test_canonical_round_trip_of_random_page_subsets(
    g: KVGeometry, layout: Layout, num_pages: int, data: st.DataObject
) -> None:
    pages = data.draw(st.permutations(range(num_pages)).map(lambda p: p[: len(p) // 2 + 1]))
    pages = pages[: data.draw(st.integers(0, len(pages)))]
    as_tensor = data.draw(st.booleans())
    index = torch.tensor(pages, dtype=torch.int64) if as_tensor else pages
    pool = random_pool(g, layout, num_pages, seed=len(pages) * 7 + num_pages)
    blobs = to_canonical(pool, layout, g, index)
    assert blobs.shape == (len(pages), g.page_elems)
    # Oracle: element_offset, which another test ties to torch indexing.
    flat = pool.reshape(-1)
    for row, page in enumerate(pages):
        assert same_bits(blobs[row], flat[canonical_index(layout, g, num_pages, page)])
    # Scatter into a poisoned pool: exactly those pages change, to exactly those bits.
    poison = random_pool(g, layout, num_pages, seed=12345)
    target = poison.clone()
    from_canonical(blobs, target, layout, g, index)
    after = to_canonical(target, layout, g, list(range(num_pages)))
    before = to_canonical(poison, layout, g, list(range(num_pages)))
    for page in range(num_pages):
        want = blobs[pages.index(page)] if page in pages else before[page]
        assert same_bits(after[page], want)


@settings(max_examples=80, deadline=None)
@given(g=geometries(), layout=st.sampled_from(LAYOUTS), num_pages=st.integers(1, 4), data=st.data())
def test_element_offset_agrees_with_indexing_the_shaped_tensor(
    g: KVGeometry, layout: Layout, num_pages: int, data: st.DataObject
) -> None:
    ids = torch.arange(num_pages * g.page_elems, dtype=torch.int64).view(
        shape(layout, g, num_pages)
    )
    index = {
        "P": data.draw(st.integers(0, num_pages - 1)),
        "L": data.draw(st.integers(0, g.num_layers - 1)),
        "kv": data.draw(st.integers(0, g.kv_factor - 1)),
        "S": data.draw(st.integers(0, g.page_size - 1)),
        "H": data.draw(st.integers(0, g.num_kv_heads - 1)),
        "D": 0,
    }
    at = tuple(index[d] for d in dims(layout))
    offset = element_offset(
        layout, g, num_pages, index["P"], index["L"], index["kv"], index["S"], index["H"]
    )
    assert int(ids[at]) == offset
    # The head's elements follow contiguously in every layout.
    assert dims(layout)[-1] == "D"
    assert ids[at[:-1]].tolist() == list(range(offset, offset + g.head_size))


def run_elements(runs: list[tuple[int, int]], itemsize: int) -> list[int]:
    out: list[int] = []
    for off, nbytes in runs:
        assert off % itemsize == 0 and nbytes % itemsize == 0
        out.extend(range(off // itemsize, (off + nbytes) // itemsize))
    return out


@settings(max_examples=80, deadline=None)
@given(g=geometries(), layout=st.sampled_from(LAYOUTS), num_pages=st.integers(1, 4), data=st.data())
def test_page_runs_cover_exactly_the_page(
    g: KVGeometry, layout: Layout, num_pages: int, data: st.DataObject
) -> None:
    page = data.draw(st.integers(0, num_pages - 1))
    layer = data.draw(st.one_of(st.none(), st.integers(0, g.num_layers - 1)))
    runs = page_runs(layout, g, num_pages, page, layer)
    # Sorted, disjoint, not adjacent (adjacent runs are merged), and the right total.
    for (a, n), (b, _) in itertools.pairwise(runs):
        assert a + n < b
    assert all(n > 0 for _, n in runs)
    assert sum(n for _, n in runs) == (g.page_bytes if layer is None else g.layer_page_bytes)
    elems = run_elements(runs, g.itemsize)
    want = canonical_index(layout, g, num_pages, page)
    if layer is not None:
        want = want.view(g.num_layers, -1)[layer]
    assert sorted(elems) == sorted(want.tolist())
    # The bytes the runs hold are what to_canonical returns, up to the order inside the page.
    pool = random_pool(g, layout, num_pages, seed=page)
    flat_bytes = pool.reshape(-1).view(torch.uint8)
    from_runs = torch.cat([flat_bytes[o : o + n] for o, n in runs])
    blob = to_canonical(pool, layout, g, [page], layer=layer).view(torch.uint8).reshape(-1)
    assert torch.equal(torch.sort(from_runs).values, torch.sort(blob).values)
    if layout is Layout.PAGE_FIRST:
        assert len(runs) == 1 and torch.equal(from_runs, blob)


@settings(max_examples=50, deadline=None)
@given(g=geometries(), layout=st.sampled_from(LAYOUTS), num_pages=st.integers(1, 3), data=st.data())
def test_head_slice_is_the_pool_of_the_sliced_geometry(
    g: KVGeometry, layout: Layout, num_pages: int, data: st.DataObject
) -> None:
    lo = data.draw(st.integers(0, g.num_kv_heads - 1))
    hi = data.draw(st.integers(lo + 1, g.num_kv_heads))
    heads = slice(lo, hi)
    sub = sliced_geometry(g, heads)
    pool = random_pool(g, layout, num_pages, seed=lo * 31 + hi)
    part = head_slice(pool, layout, g, heads)
    assert part.shape == shape(layout, sub, num_pages)
    assert part.data_ptr() >= pool.data_ptr()  # a view, no copy
    everything = list(range(num_pages))
    full = to_canonical(pool, layout, g, everything).view(
        num_pages, g.num_layers, g.kv_factor, g.page_size, g.num_kv_heads, g.head_size
    )
    want = full[:, :, :, :, lo:hi, :].reshape(num_pages, -1)
    assert same_bits(to_canonical(part.contiguous(), layout, sub, everything), want)
    runs = page_runs(layout, g, num_pages, 0, heads=heads)
    assert sum(n for _, n in runs) == sub.page_bytes
    if layout is Layout.PAGE_HEAD:
        # A TP reader takes its heads of a page as one contiguous run.
        assert len(runs) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu_bit_for_bit(dtype: str) -> None:
    g = KVGeometry(3, 5, 16, 7, dtype)
    pages = [4, 0, 2]
    for src, dst in itertools.product(LAYOUTS, LAYOUTS):
        cpu = random_pool(g, src, 6, seed=1)
        gpu = cpu.cuda()
        assert same_bits(convert(gpu, src, dst, g).cpu(), convert(cpu, src, dst, g))
        blobs = to_canonical(gpu, src, g, torch.tensor(pages, device="cuda"))
        assert same_bits(blobs.cpu(), to_canonical(cpu, src, g, pages))
        target = torch.zeros_like(gpu)
        from_canonical(blobs, target, src, g, pages)
        assert same_bits(to_canonical(target, src, g, pages).cpu(), blobs.cpu())
