"""The Triton kernels' index arithmetic on the CPU, through Triton's interpreter
(TRITON_INTERPRET=1), against the torch path bit for bit. Skipped where triton is not installed
and on CUDA machines (test_transfer_gpu.py runs the compiled kernels there)."""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import os
import random
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch
from transfer_kv_fixtures import build

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
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    from kvtier.transfer import triton_kernels

    yield importlib.reload(triton_kernels)
    if old is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = old
    importlib.reload(triton_kernels)


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


@pytest.mark.parametrize(
    "g", [KVGeometry(2, 2, 32, 4, "bfloat16"), KVGeometry(2, 1, 576, 2, "bfloat16", mla=True)]
)
def test_convert_kernel_matches_torch(kernels: ModuleType, g: KVGeometry) -> None:
    from kvtier.transfer.convert import convert_layout

    gen = torch.Generator().manual_seed(2)
    for frm, to in itertools.product(list(Layout), repeat=2):
        src = torch.randint(-(2**15), 2**15, shape(frm, g, 3), dtype=torch.int16, generator=gen)
        out = convert_layout(src, frm, to, g, path="triton", triton_module=kernels)
        assert torch.equal(out.view(torch.int16), torch_convert(src, frm, to, g).view(torch.int16))
