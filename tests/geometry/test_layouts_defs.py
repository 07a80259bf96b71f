"""Unit tests that pin the exact layout definitions, and the API's handling of odd input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kvtier.errors import ConfigError
from kvtier.geometry import (
    CANONICAL_LAYOUT,
    PRESETS,
    KVGeometry,
    Layout,
    convert,
    dims,
    element_offset,
    empty_pool,
    from_canonical,
    head_slice,
    page_runs,
    parse_layout,
    pool_elems,
    run_count,
    shape,
    sliced_geometry,
    strides,
    to_canonical,
)

# L=2 layers, kv=2, S=2 tokens, H=2 heads, D=2, fp32 (4 bytes); pools of P=3 pages.
TINY = KVGeometry(num_layers=2, num_kv_heads=2, head_size=2, page_size=2, dtype="float32")
P = 3
LF, PF, PFD, PH = Layout.LAYER_FIRST, Layout.PAGE_FIRST, Layout.PAGE_FIRST_DIRECT, Layout.PAGE_HEAD


def arange_pool(layout: Layout, g: KVGeometry = TINY, num_pages: int = P) -> torch.Tensor:
    """A dense pool whose every element holds its own flat index."""
    return torch.arange(pool_elems(g, num_pages), dtype=torch.float32).view(
        shape(layout, g, num_pages)
    )


def test_dims_shapes_and_strides_are_pinned() -> None:
    assert dims(LF) == ("L", "kv", "P", "S", "H", "D")
    assert dims(PF) == ("P", "L", "kv", "S", "H", "D")
    assert dims(PFD) == ("P", "kv", "L", "S", "H", "D")
    assert dims(PH) == ("P", "H", "L", "kv", "S", "D")
    assert CANONICAL_LAYOUT is PF
    assert shape(LF, TINY, P) == (2, 2, 3, 2, 2, 2)
    assert strides(LF, TINY, P) == (48, 24, 8, 4, 2, 1)
    for layout in (PF, PFD, PH):
        assert shape(layout, TINY, P) == (3, 2, 2, 2, 2, 2)
        assert strides(layout, TINY, P) == (32, 16, 8, 4, 2, 1)
    mla = KVGeometry(num_layers=2, num_kv_heads=1, head_size=3, page_size=2, mla=True)
    assert shape(LF, mla, 4) == (2, 1, 4, 2, 1, 3)
    assert shape(PH, mla, 4) == (4, 1, 2, 1, 2, 3)


def test_element_offsets_are_pinned() -> None:
    # page 1, layer 1, K, token 1, head 1
    assert element_offset(LF, TINY, P, 1, 1, 0, 1, 1) == 48 + 8 + 4 + 2
    assert element_offset(PF, TINY, P, 1, 1, 0, 1, 1) == 32 + 16 + 4 + 2
    assert element_offset(PFD, TINY, P, 1, 1, 0, 1, 1) == 32 + 8 + 4 + 2
    assert element_offset(PH, TINY, P, 1, 1, 0, 1, 1) == 32 + 16 + 8 + 2
    # ... and V of the same token
    assert element_offset(LF, TINY, P, 1, 1, 1, 1, 1) == 48 + 24 + 8 + 4 + 2
    assert element_offset(PH, TINY, P, 1, 1, 1, 1, 1) == 32 + 16 + 8 + 4 + 2
    with pytest.raises(IndexError):
        element_offset(PF, TINY, P, 3, 0, 0, 0, 0)
    with pytest.raises(IndexError):
        element_offset(PF, TINY, P, 0, 0, 2, 0, 0)


def test_page_runs_are_pinned() -> None:
    assert page_runs(LF, TINY, P, 1) == [(32, 32), (128, 32), (224, 32), (320, 32)]
    for layout in (PF, PFD, PH):
        assert page_runs(layout, TINY, P, 1) == [(128, 128)]
    assert page_runs(LF, TINY, P, 1, 1) == [(224, 32), (320, 32)]
    assert page_runs(PF, TINY, P, 1, 1) == [(192, 64)]
    assert page_runs(PFD, TINY, P, 1, 1) == [(160, 32), (224, 32)]
    assert page_runs(PH, TINY, P, 1, 1) == [(160, 32), (224, 32)]
    assert page_runs(PH, TINY, P, 1, heads=slice(1, 2)) == [(192, 64)]
    assert page_runs(PF, TINY, P, 1, heads=slice(1, 2)) == [
        (128 + 4 * i, 8) for i in range(2, 32, 4)
    ]
    # One page in a one-page pool: the layer-first chunks are adjacent and merge.
    assert page_runs(LF, TINY, 1, 0) == [(0, 128)]
    with pytest.raises(IndexError):
        page_runs(PF, TINY, P, 3)
    with pytest.raises(IndexError):
        page_runs(PF, TINY, P, 0, 2)


def test_run_counts_for_llama3_8b() -> None:
    g = PRESETS["llama3-8b"]
    assert [run_count(lay, g) for lay in (LF, PF, PFD, PH)] == [64, 1, 1, 1]
    assert [run_count(lay, g, layer=True) for lay in (LF, PF, PFD, PH)] == [2, 1, 2, 8]


def test_to_canonical_of_an_arange_pool_is_pinned() -> None:
    lf = to_canonical(arange_pool(LF), LF, TINY, [1])
    want = [*range(8, 16), *range(32, 40), *range(56, 64), *range(80, 88)]
    assert lf.tolist() == [[float(v) for v in want]]
    pfd = to_canonical(arange_pool(PFD), PFD, TINY, [0])
    # canonical [L][kv] order reads PFD's [kv][L] chunks as K0, V0, K1, V1
    want = [*range(0, 8), *range(16, 24), *range(8, 16), *range(24, 32)]
    assert pfd[0].tolist() == [float(v) for v in want]
    ph = to_canonical(arange_pool(PH), PH, TINY, [2])
    want = [
        64 + h * 16 + layer * 8 + kv * 4 + s * 2 + d
        for layer in range(2)
        for kv in range(2)
        for s in range(2)
        for h in range(2)
        for d in range(2)
    ]
    assert ph[0].tolist() == [float(v) for v in want]
    pf = to_canonical(arange_pool(PF), PF, TINY, [2, 0])
    assert pf.tolist() == arange_pool(PF).view(3, 32)[[2, 0]].tolist()


def test_parse_layout() -> None:
    assert parse_layout("page_first") is PF
    assert parse_layout("Page-Head") is PH
    assert parse_layout(LF) is LF
    assert Layout("page_first_direct") is PFD and PFD == "page_first_direct"
    with pytest.raises(ConfigError) as err:
        parse_layout("token_first")
    assert err.value.field == "layout"
    assert "page_first_direct" in str(err.value)


def test_pool_forms_flat_bytes_and_strided_views() -> None:
    pool = arange_pool(PFD)
    want = to_canonical(pool, PFD, TINY, [2, 1])
    assert torch.equal(to_canonical(pool.reshape(-1), PFD, TINY, [2, 1]), want)
    assert torch.equal(to_canonical(pool.view(torch.uint8), PFD, TINY, [2, 1]), want)
    # A layer-first pool seen through a permuted (non-contiguous) page-first view.
    lf = arange_pool(LF)
    view = lf.permute(2, 0, 1, 3, 4, 5)
    assert not view.is_contiguous()
    assert torch.equal(to_canonical(view, PF, TINY, [1]), to_canonical(lf, LF, TINY, [1]))
    target = torch.zeros_like(lf)
    from_canonical(want[:1], target.permute(2, 0, 1, 3, 4, 5), PF, TINY, [0])
    assert torch.equal(to_canonical(target, LF, TINY, [0]), want[:1])
    # Writing through a flat uint8 buffer updates the buffer itself.
    buf = torch.zeros(P * TINY.page_bytes, dtype=torch.uint8)
    from_canonical(want.view(torch.uint8), buf, PH, TINY, torch.tensor([0, 2]))
    assert torch.equal(to_canonical(buf, PH, TINY, [0, 2]), want)
    assert buf.view(torch.float32).view(shape(PH, TINY, P))[1].abs().sum() == 0


def test_bad_pools_and_pages_are_refused() -> None:
    pool = arange_pool(PF)
    with pytest.raises(ValueError, match="shape"):
        to_canonical(arange_pool(LF), PF, TINY, [0])  # six axes, wrong layout named
    with pytest.raises(ValueError, match="whole number of pages"):
        to_canonical(pool.reshape(-1)[:-1], PF, TINY, [0])
    with pytest.raises(ValueError, match="contiguous"):
        to_canonical(pool.view(3, 32).t(), PF, TINY, [0])
    with pytest.raises(ValueError, match="cannot hold"):
        to_canonical(pool.to(torch.float16), PF, TINY, [0])
    with pytest.raises(IndexError):
        to_canonical(pool, PF, TINY, [3])
    with pytest.raises(IndexError):
        to_canonical(pool, PF, TINY, [0], layer=2)
    blobs = to_canonical(pool, PF, TINY, [0, 1])
    with pytest.raises(ValueError, match="repeat"):
        from_canonical(blobs, pool.clone(), PF, TINY, [1, 1])
    with pytest.raises(ValueError, match="blobs hold"):
        from_canonical(blobs, pool.clone(), PF, TINY, [0, 1, 2])
    with pytest.raises(ValueError):
        head_slice(pool, PH, TINY, slice(0, 2, 2))
    with pytest.raises(ValueError):
        sliced_geometry(TINY, slice(2, 2))
    empty = to_canonical(pool, PF, TINY, [])
    assert empty.shape == (0, TINY.page_elems)


def test_per_layer_movement() -> None:
    src = arange_pool(LF)
    rows = to_canonical(src, LF, TINY, [2, 0], layer=1)
    assert rows.shape == (2, TINY.layer_page_bytes // TINY.itemsize)
    whole = to_canonical(src, LF, TINY, [2, 0]).view(2, 2, -1)
    assert torch.equal(rows, whole[:, 1])
    dst = torch.full_like(arange_pool(PH), -1.0)
    from_canonical(rows, dst, PH, TINY, [0, 1], layer=1)
    got = to_canonical(dst, PH, TINY, [0, 1, 2]).view(3, 2, -1)
    assert torch.equal(got[:2, 1], rows)
    assert bool((got[:2, 0] == -1).all()) and bool((got[2] == -1).all())


def test_head_slice_of_page_head_is_contiguous_per_page() -> None:
    pool = arange_pool(PH)
    part = head_slice(pool, PH, TINY, slice(1, 2))
    assert part.shape == (3, 1, 2, 2, 2, 2)
    assert part[1].is_contiguous()
    assert part[1].reshape(-1).tolist() == [float(v) for v in range(48, 64)]
    sub = sliced_geometry(TINY, slice(1, 2))
    assert sub.num_kv_heads == 1 and sub.page_bytes == TINY.page_bytes // 2
    # The slice, made dense, is a valid pool of the reader's geometry in any layout.
    as_pf = convert(part.contiguous(), PH, PF, sub)
    assert torch.equal(
        as_pf.view(3, -1),
        to_canonical(pool, PH, TINY, [0, 1, 2]).view(3, 2, 2, 2, 2, 2)[..., 1:2, :].reshape(3, -1),
    )


def test_empty_pool_and_fp8_movement() -> None:
    g = KVGeometry(num_layers=3, num_kv_heads=3, head_size=4, page_size=3, dtype="fp8")
    pool = empty_pool(LF, g, 4)
    assert pool.dtype == torch.float8_e4m3fn and pool.shape == shape(LF, g, 4)
    pool.view(torch.uint8).copy_(torch.arange(pool.numel()).remainder(256).view(pool.shape))
    blobs = to_canonical(pool, LF, g, [3, 1])
    assert blobs.dtype == torch.float8_e4m3fn
    back = torch.zeros_like(pool)
    from_canonical(blobs, back, LF, g, [3, 1])
    got = back.view(torch.uint8).view(shape(LF, g, 4))
    want = pool.view(torch.uint8).view(shape(LF, g, 4))
    assert torch.equal(got[:, :, [1, 3]], want[:, :, [1, 3]])
    assert int(got[:, :, [0, 2]].sum()) == 0


def test_importing_geometry_does_not_import_torch() -> None:
    code = "import sys, kvtier.geometry; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
