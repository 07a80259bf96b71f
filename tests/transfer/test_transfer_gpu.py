"""GPU paths of the copy engine against the CPU torch path, bit for bit (device machine only)."""

from __future__ import annotations

import dataclasses
import itertools
import random
import zlib

import pytest
import torch

from kvtier.geometry.layout_ops import convert as torch_convert
from kvtier.geometry.layouts import Layout, shape
from kvtier.geometry.spec import KVGeometry
from kvtier.memory.host_pool import HostPool
from kvtier.transfer.device_kv import DeviceKV
from kvtier.transfer.engine import CopyEngine
from kvtier.transfer.thresholds import Staged, Thresholds
from kvtier.transfer.torch_path import host_planes, load_cpu, move_dtype, store_cpu

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GEOMS = {
    "bf16-bs16": (KVGeometry(4, 2, 128, 16, "bfloat16"), 16),
    "bf16-bs4": (KVGeometry(3, 2, 64, 16, "bfloat16"), 4),
    "fp32-small": (KVGeometry(2, 1, 32, 8, "float32"), 8),
    "fp8": (KVGeometry(2, 2, 64, 16, "fp8"), 8),
    "mla": (KVGeometry(3, 1, 576, 16, "bfloat16", mla=True), 16),
    "odd-item": (KVGeometry(2, 1, 12, 4, "float16"), 1),  # 24-byte items
}
PATHS = ["triton", "dma", "torch", "auto", "staged", "staged-chunked", "staged-batch"]
# the same engines with submit threads (kvtier.transfer.submit_worker)
THREADED = ["auto+threads", "triton+threads", "staged-chunked+threads"]


def _engine(dkv: DeviceKV, pool: HostPool, path: str) -> CopyEngine:
    """`staged-chunked`: chunks of ~2.5 pages and 2 buffers (many chunks per job, buffers
    reused within a job); `staged-batch`: the same with batched driver copies; a "+threads"
    suffix turns submit threads on."""
    path, plus, _ = path.partition("+threads")
    threads = bool(plus)
    if not path.startswith("staged-"):
        return CopyEngine(dkv, pool, path=path, submit_threads=threads)
    chunk = int(2.5 * dkv.geometry.page_bytes)
    staged = Staged(chunk_bytes=chunk, buffers=2, batch=path == "staged-batch")
    th = dataclasses.replace(Thresholds.read(), staged=staged)
    return CopyEngine(dkv, pool, path="staged", thresholds=th, submit_threads=threads)


def _rand(shape_: tuple[int, ...], g: KVGeometry, dev: str) -> torch.Tensor:
    t = torch.empty(shape_, dtype=move_dtype(g.itemsize), device=dev)
    t.view(torch.uint8).random_(0, 256)
    return t


def _layers(g: KVGeometry, bs: int, nb: int, kind: str, dev: str) -> list[torch.Tensor]:
    if g.mla:
        return [_rand((nb, bs, g.head_size), g, dev) for _ in range(g.num_layers)]
    if kind == "blocks_first":
        return [
            _rand((nb, 2, bs, g.num_kv_heads, g.head_size), g, dev) for _ in range(g.num_layers)
        ]
    if kind == "shared":  # hybrid allocator: layer pairs share one tensor
        base = [
            _rand((2, nb, bs, g.num_kv_heads, g.head_size), g, dev)
            for _ in range((g.num_layers + 1) // 2)
        ]
        return [base[i // 2] for i in range(g.num_layers)]
    return [_rand((2, nb, bs, g.num_kv_heads, g.head_size), g, dev) for _ in range(g.num_layers)]


def _case(name: str, kind: str, path: str, layerwise: bool, consecutive: bool = False) -> None:
    g, bs = GEOMS[name]
    n = g.page_size // bs
    nb, pages, num_slots = 40 * n, 13, 32
    rng = random.Random(zlib.crc32(f"{name}/{kind}/{path}/{layerwise}".encode()))
    gpu_layers = _layers(g, bs, nb, kind, "cuda")
    cpu_layers = [t.cpu() for t in gpu_layers]
    if kind == "shared":  # keep the sharing on the CPU copy too
        uniq = {id(t): t.cpu() for t in gpu_layers}
        cpu_layers = [uniq[id(t)] for t in gpu_layers]
    dkv = DeviceKV.from_vllm(gpu_layers, g, bs)
    ref = DeviceKV.from_vllm(cpu_layers, g, bs)
    pool = HostPool(num_slots, g.page_bytes, pin=True)
    ref_pool = HostPool(num_slots, g.page_bytes, pin=False)
    eng = _engine(dkv, pool, path)
    blocks = torch.tensor(rng.sample(range(nb), pages * n)).view(pages, n)
    slots = list(range(5, 5 + pages)) if consecutive else rng.sample(range(num_slots), pages)
    ref_pool.payloads().fill_(0xA5)
    for _ in range(2):  # a second job on the same engine: staging and kernels reused
        pool.tensor.fill_(0xA5)
        res = eng.wait(eng.submit_store(blocks, slots))
        assert res.success and res.op == "store"
    store_cpu(ref, host_planes(ref_pool, ref), blocks, torch.tensor(slots))
    assert torch.equal(pool.payloads(), ref_pool.payloads()), f"store {name} {kind} {path}"
    others = torch.ones(num_slots, dtype=torch.bool)
    others[slots] = False  # slots outside the job: not one byte written, headers included
    assert bool((pool.tensor[others] == 0xA5).all()), f"other slots {name} {kind} {path}"
    # load other random pages from random slots into other blocks; poison them first
    pool.payloads()[torch.tensor(slots)] = torch.randint(
        0, 256, (pages, g.page_bytes), dtype=torch.uint8
    )
    ref_pool.payloads().copy_(pool.payloads())
    lblocks = torch.tensor(rng.sample(range(nb), pages * n)).view(pages, n)
    for t in {id(x): x for x in cpu_layers}.values():
        t.view(torch.uint8).fill_(0x5A)
    for _ in range(2):
        for t in {id(x): x for x in gpu_layers}.values():
            t.view(torch.uint8).fill_(0x5A)
        job = eng.submit_load(slots, lblocks, layerwise=layerwise)
        if layerwise:
            for layer in range(g.num_layers):
                eng.wait_layer(job, layer)
        assert eng.wait(job).success
    load_cpu(ref, host_planes(ref_pool, ref), torch.tensor(slots), lblocks)
    torch.cuda.synchronize()
    for a, b in zip(gpu_layers, cpu_layers):
        assert torch.equal(a.cpu().view(torch.uint8), b.view(torch.uint8)), f"load {name} {path}"
    eng.close()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", sorted(GEOMS))
def test_paths_match_cpu(name: str, path: str) -> None:
    _case(name, "vllm", path, layerwise=False)


@pytest.mark.parametrize("path", ["staged", "staged-chunked", "staged-batch", "auto"])
@pytest.mark.parametrize("name", ["bf16-bs16", "mla"])
def test_pages_in_consecutive_slots(name: str, path: str) -> None:
    """Whole pages in consecutive slots go out as one copy per chunk (staged_plan.Layout.gap)
    where the slot gap is small next to a page (bf16-bs16: 64 KiB pages, 68 KiB slots)."""
    _case(name, "vllm", path, layerwise=False, consecutive=True)


@pytest.mark.parametrize("path", PATHS + THREADED)
@pytest.mark.parametrize("kind", ["blocks_first", "shared"])
def test_adapters_and_layerwise(kind: str, path: str) -> None:
    _case("bf16-bs4", kind, path, layerwise=True)


@pytest.mark.parametrize("path", ["triton", "dma", "staged", "staged-chunked", *THREADED])
def test_store_and_load_at_once(path: str) -> None:
    g = KVGeometry(8, 2, 128, 16, "bfloat16")
    nb = 256
    layers = _layers(g, 16, nb, "vllm", "cuda")
    pool = HostPool(256, g.page_bytes, pin=True)
    pool.payloads().random_(0, 256)
    expect_host = pool.payloads()[128:].clone()
    eng = _engine(DeviceKV.from_vllm(layers, g, 16), pool, path)
    # the compute stream writes blocks 0..127 just before the store is submitted: the store
    # must see the new values (it is ordered after the compute stream)
    for t in layers:
        t[:, :128].fill_(7)
    a = eng.submit_store(torch.arange(128).view(-1, 1), list(range(128)))
    b = eng.submit_load(list(range(128, 256)), torch.arange(128, 256).view(-1, 1))
    assert eng.wait(a).success and eng.wait(b).success
    assert bool((pool.payloads()[:128].view(torch.int16) == 7).all())
    got = torch.stack([torch.stack([t[k, 128:] for k in range(2)], 1) for t in layers], 1)
    assert torch.equal(got.reshape(128, -1).view(torch.uint8).cpu(), expect_host)


@pytest.mark.parametrize("threads", [False, True])
@pytest.mark.parametrize("layerwise", [False, True])
def test_staged_back_to_back_jobs(layerwise: bool, threads: bool) -> None:
    """Several staged jobs in flight on one engine reuse the same staging buffers: each job's
    bytes must still be its own (the per-buffer events order them); auto picks staged."""
    g = KVGeometry(4, 2, 128, 16, "bfloat16")
    nb, per = 200, 40
    layers = _layers(g, 16, nb, "vllm", "cuda")
    pool = HostPool(200, g.page_bytes, pin=True)
    th = dataclasses.replace(
        Thresholds.read(),
        staged=Staged(min_job_bytes=0, min_run_bytes=0, chunk_bytes=3 * g.page_bytes, buffers=2),
    )
    eng = CopyEngine(
        DeviceKV.from_vllm(layers, g, 16), pool, path="auto", thresholds=th, submit_threads=threads
    )
    rng = random.Random(5)
    perm = rng.sample(range(nb), nb)
    slots = rng.sample(range(200), 200)
    jobs = [
        eng.submit_store(
            torch.tensor(perm[i * per : (i + 1) * per]).view(-1, 1), slots[i * per : (i + 1) * per]
        )
        for i in range(4)
    ]
    assert all(eng.wait(j).success for j in jobs)
    for i in range(4):
        blk = torch.tensor(perm[i * per : (i + 1) * per], device="cuda")
        exp = torch.stack([torch.stack([t[k, blk] for k in range(2)], 1) for t in layers], 1)
        got = pool.payloads()[slots[i * per : (i + 1) * per]]
        assert torch.equal(exp.reshape(per, -1).view(torch.uint8).cpu(), got), f"store job {i}"
    # load every stored page back into other blocks, in four jobs, then compare
    dst = perm[160:] + perm[:120]
    for t in layers:
        t[:, dst] = 0
    jobs = [
        eng.submit_load(
            slots[i * per : (i + 1) * per],
            torch.tensor(dst[i * per : (i + 1) * per]).view(-1, 1),
            layerwise=layerwise,
        )
        for i in range(4)
    ]
    assert all(eng.wait(j).success for j in jobs)
    blk = torch.tensor(dst[:160], device="cuda")
    got = torch.stack([torch.stack([t[k, blk] for k in range(2)], 1) for t in layers], 1)
    assert torch.equal(got.reshape(160, -1).view(torch.uint8).cpu(), pool.payloads()[slots[:160]])


@pytest.mark.parametrize("geom", ["bf16-bs16", "mla", "fp32-small"])
@pytest.mark.parametrize(("tile", "warps"), [(8192, 4), (32768, 8)])
def test_layout_conversion_matches_torch(geom: str, tile: int, warps: int) -> None:
    from kvtier.transfer.convert import convert_layout

    g, _ = GEOMS[geom]
    pages = 9
    for frm, to in itertools.product(list(Layout), repeat=2):
        src = _rand(shape(frm, g, pages), g, "cuda")
        out = torch.empty(shape(to, g, pages), dtype=src.dtype, device="cuda").fill_(-1)
        convert_layout(src, frm, to, g, out=out, path="triton", tile_bytes=tile, num_warps=warps)
        ref = torch_convert(src.cpu(), frm, to, g)
        assert torch.equal(out.cpu().view(torch.uint8), ref.view(torch.uint8)), (frm, to)
