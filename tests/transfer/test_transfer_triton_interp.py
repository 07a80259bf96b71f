"""The Triton kernels' index arithmetic on the CPU, through Triton's interpreter
(TRITON_INTERPRET=1), against the torch path bit for bit. Skipped where triton is not installed
and on CUDA machines (test_transfer_gpu.py runs the compiled kernels there)."""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import random
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch
from transfer_kv_fixtures import build
from triton_interp import interpreted_kernels

from kvtier.geometry.layout_ops import convert as torch_convert
from kvtier.geometry.layouts import Layout, shape
from kvtier.geometry.spec import KVGeometry
from kvtier.memory.host_pool import HostPool
from kvtier.transfer.gpu_paths import GPUPaths
from kvtier.transfer.thresholds import Thresholds
from kvtier.transfer.torch_path import host_planes, load_cpu, store_cpu

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="compiled kernels are tested on GPU"),
]


@pytest.fixture(scope="module")
def kernels() -> Iterator[ModuleType]:
    with interpreted_kernels() as mod:
        yield mod


CASES = [
    ("vllm", KVGeometry(2, 2, 16, 8, "bfloat16"), 4, 64),  # 2 chunks per item
    ("vllm_blocks_first", KVGeometry(2, 1, 12, 4, "float16"), 1, 1 << 14),  # 24-byte items
    ("vllm_shared", KVGeometry(4, 1, 8, 4, "float32"), 4, 1 << 14),
    ("cross_layer_mla", KVGeometry(2, 1, 40, 4, "bfloat16", mla=True), 2, 1 << 14),
]


@pytest.mark.parametrize(("kind", "g", "bs", "tile"), CASES)
def test_copy_kernel_matches_torch(
    kernels: ModuleType, kind: str, g: KVGeometry, bs: int, tile: int
) -> None:
    rng = random.Random(7)
    n = g.page_size // bs
    nb, pages = 6 * n, 4
    dkv, _, tensors = build(kind, g, bs, nb, seed=1)
    ref_dkv, _, ref_tensors = build(kind, g, bs, nb, seed=1)
    pool, ref_pool = HostPool(8, g.page_bytes, pin=False), HostPool(8, g.page_bytes, pin=False)
    gp = GPUPaths(dkv, pool, Thresholds.from_dict({"triton": {"block_bytes": tile}}))
    gp.triton = kernels
    blocks = torch.tensor(rng.sample(range(nb), pages * n)).view(pages, n)
    slots = torch.tensor(rng.sample(range(8), pages))
    pool.payloads().fill_(0xA5)
    ref_pool.payloads().fill_(0xA5)
    gp.run("store", "triton", blocks, slots, list(range(dkv.num_planes)), host_planes(pool, dkv))
    store_cpu(ref_dkv, host_planes(ref_pool, ref_dkv), blocks, slots)
    assert torch.equal(pool.payloads(), ref_pool.payloads())
    lblocks = torch.tensor(rng.sample(range(nb), pages * n)).view(pages, n)
    for t in tensors + ref_tensors:
        t.view(torch.uint8).fill_(0x5A)
    for layer in range(g.num_layers):  # layer by layer, as a layer-wise load launches it
        planes = dkv.write_planes(range(layer, layer + 1))
        gp.run("load", "triton", lblocks, slots, planes, host_planes(pool, dkv))
    load_cpu(ref_dkv, host_planes(ref_pool, ref_dkv), slots, lblocks)
    for a, b in zip(tensors, ref_tensors):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


CONVERT_CASES = [
    (KVGeometry(2, 2, 32, 4, "bfloat16"), 3, 8192),
    (KVGeometry(2, 1, 576, 2, "bfloat16", mla=True), 3, 8192),
    (KVGeometry(3, 1, 64, 4, "float16"), 5, 8192),  # one head: page_head merges away
    (KVGeometry(2, 2, 24, 3, "bfloat16"), 5, 256),  # 8-element rows, masked last tile
    (KVGeometry(2, 3, 5, 2, "bfloat16"), 3, 64),  # odd head size: rows of one element
    (KVGeometry(3, 2, 16, 4, "float32"), 1, 4096),  # one page: the P axis vanishes
    (KVGeometry(2, 2, 32, 8, "float32"), 2, 1 << 16),  # tile larger than the pool
]


@pytest.mark.parametrize(("g", "pages", "tile"), CONVERT_CASES)
def test_convert_kernel_matches_torch(
    kernels: ModuleType, g: KVGeometry, pages: int, tile: int
) -> None:
    from kvtier.transfer.convert import convert_layout

    move = {2: torch.int16, 4: torch.int32}[g.itemsize]
    lim = 2 ** (8 * g.itemsize - 1)
    gen = torch.Generator().manual_seed(2)
    for frm, to in itertools.product(list(Layout), repeat=2):
        src = torch.randint(-lim, lim, shape(frm, g, pages), dtype=torch.int64, generator=gen)
        src = src.to(move)
        out = torch.full(shape(to, g, pages), -1, dtype=move)
        convert_layout(
            src, frm, to, g, out=out, path="triton", triton_module=kernels, tile_bytes=tile
        )
        assert torch.equal(out, torch_convert(src, frm, to, g).view(move)), (frm, to)


def test_convert_plan_merges_contiguous_axes() -> None:
    from kvtier.transfer.convert import merged_axes, plan

    g = KVGeometry(4, 8, 128, 16, "bfloat16")
    chunk = 16 * 8 * 128
    # layer_first -> page_first: whole [S][H][D] chunks, contiguous on both sides
    assert merged_axes(Layout.LAYER_FIRST, Layout.PAGE_FIRST, g, 10) == [
        (10, chunk),
        (4 * 2, 10 * chunk),
        (chunk, 1),
    ]
    assert merged_axes(Layout.PAGE_HEAD, Layout.PAGE_HEAD, g, 10) == [(10 * g.page_elems, 1)]
    p = plan(Layout.LAYER_FIRST, Layout.PAGE_FIRST, g, 10, 8192)
    assert (p.row, p.rows_per_tile, p.n_rows) == (4096, 1, 10 * g.page_elems // 4096)
    assert p.sizes[-1] == chunk // 4096 and p.steps[-1] == 4096
