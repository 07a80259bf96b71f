"""The GPU rows of `kvtier bench vmm` (imported only when CUDA is available)."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from kvtier.cli.bench_vmm import Row, alloc_rows, row
from kvtier.geometry import KVGeometry
from kvtier.memory.elastic import ElasticPool
from kvtier.memory.elastic_layout import ElasticLayout, PoolLimits
from kvtier.memory.elastic_torch import cross_layer_tensor
from kvtier.memory.vmm_backend import PAGE_BYTES
from kvtier.memory.vmm_cuda import CudaVmmBackend


def gpu_rows(args: argparse.Namespace) -> list[Row]:
    import torch

    torch.cuda.init()
    be = CudaVmmBackend()
    rows = alloc_rows(be, args.pages, "cuda")
    if be.device_count() >= 2 and be.can_access_peer(0, 1):
        rows += peer_rows(be, args.peer_mib << 20)
    else:
        rows.append(row("peer read", None, "", "", None, "skipped: needs 2 peer-capable GPUs"))
    rows += attention_rows(be, args.attn_seqs, args.attn_tokens)
    be.close()
    return rows


def _wall(fn: Any, iters: int) -> float:
    """Seconds per call, all devices synchronised around the loop."""
    import torch

    fn()
    for d in range(torch.cuda.device_count()):
        torch.cuda.synchronize(d)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    for d in range(torch.cuda.device_count()):
        torch.cuda.synchronize(d)
    return (time.perf_counter() - t0) / iters


def peer_rows(be: CudaVmmBackend, nbytes: int) -> list[Row]:
    """GPU0 kernels reading pages that live on GPU1 against a GPU1->GPU0 peer memcpy."""
    import torch

    pages = max(1, nbytes // PAGE_BYTES)
    nbytes = pages * PAGE_BYTES
    lay = ElasticLayout(regions=1, chunk_bytes=PAGE_BYTES, num_blocks=pages)
    limits = PoolLimits(None, ((1, nbytes),), local=0)  # every page on the peer
    pool = ElasticPool(be, lay, 0, limits, reserve_slots=0)
    try:
        blocks = pool.alloc(pages)
        if any(pool.device_of(b) != 1 for b in blocks):
            raise RuntimeError("peer pool placed a page off GPU1")
        n = nbytes // 2
        src = be.tensor(pool.base, (n,), torch.float16, 0)
        # only GPU0 has access to the pool's range: fill it from GPU0, never via GPU1
        peer = torch.randn(n, device="cuda:1", dtype=torch.float16)
        src.copy_(peer.to("cuda:0"))
        dst = torch.empty(n, device="cuda:0", dtype=torch.float16)
        torch.neg(src, out=dst)
        if not torch.equal(dst, -peer.to("cuda:0")):
            raise RuntimeError("kernel read of peer pages returned wrong data")
        iters = 20
        t_memcpy = _wall(lambda: dst.copy_(peer), iters)
        t_kernel = _wall(lambda: torch.neg(src, out=dst), iters)
        t_sum = _wall(lambda: src.sum(dtype=torch.float32), iters)
        gbs = {k: nbytes / t / 1e9 for k, t in
               (("memcpy", t_memcpy), ("kernel", t_kernel), ("sum", t_sum))}
        ratio = max(gbs["kernel"], gbs["sum"]) / gbs["memcpy"]
        pool.free(blocks)
    finally:
        pool.close()
    return [
        row("peer memcpy GPU1->GPU0 (ceiling)", gbs["memcpy"], "GB/s", "-", None),
        row("GPU0 kernel reading GPU1 pages (neg: read+local write)", gbs["kernel"], "GB/s",
            "-", None),
        row("GPU0 kernel reading GPU1 pages (sum: read only)", gbs["sum"], "GB/s", "-", None),
        row("peer-page kernel read / peer memcpy", 100 * ratio, "%", ">= 90", ratio >= 0.9),
    ]


def attention_rows(be: CudaVmmBackend, seqs: int, tokens: int) -> list[Row]:
    """Decode SDPA over paged layer-first KV: elastic view vs a static tensor, same block
    table (shuffled, as after hours of serving), timed interleaved."""
    import torch
    import torch.nn.functional as F

    geo = KVGeometry(4, 8, 128, 16, "bfloat16")
    nblk = tokens // geo.page_size
    lay = ElasticLayout.layer_first(geo, seqs * nblk)
    pool = ElasticPool(be, lay, 0, reserve_slots=0)
    try:
        elastic = cross_layer_tensor(pool, geo)
        if int(elastic.count_nonzero()) != 0:
            raise RuntimeError("unbacked elastic KV does not read as zeros")
        blocks = pool.alloc(seqs * nblk)
        gen = torch.Generator(device="cuda:0").manual_seed(0)
        perm = torch.randperm(len(blocks), device="cuda:0", generator=gen)
        table = torch.tensor(blocks, device="cuda:0")[perm].view(seqs, nblk)
        static = torch.randn(elastic.shape, device="cuda:0", generator=gen).to(torch.bfloat16)
        elastic.copy_(static)
        q = torch.randn(seqs, 32, 1, 128, device="cuda:0", generator=gen).to(torch.bfloat16)

        def attend(cache: Any) -> Any:
            out = []
            for layer in range(geo.num_layers):
                k = cache[layer, 0][table].view(seqs, tokens, 8, 128).transpose(1, 2)
                v = cache[layer, 1][table].view(seqs, tokens, 8, 128).transpose(1, 2)
                out.append(F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
            return torch.stack(out)

        if not torch.equal(attend(elastic), attend(static)):
            raise RuntimeError("attention over elastic KV differs from the static tensor")
        times: dict[str, list[float]] = {"static": [], "elastic": []}
        for _ in range(15):
            for name, cache in (("static", static), ("elastic", elastic)):
                times[name].append(_wall(lambda c=cache: attend(c), 3))
        t_s, t_e = statistics.median(times["static"]), statistics.median(times["elastic"])
        pool.free(blocks)
        pool.check_integrity()
        torch.cuda.synchronize()
        if pool.mapped_bytes() or int(elastic.count_nonzero()) != 0:
            raise RuntimeError("released elastic KV pages do not read as zeros")
    finally:
        pool.close()
    ratio = t_e / t_s
    note = f"{seqs} seqs x {tokens} tokens, 4 layers, GQA 32/8, bf16"
    return [
        row("SDPA decode over static KV", t_s * 1e3, "ms", "-", None, note),
        row("SDPA decode over elastic KV", t_e * 1e3, "ms", "-", None, note),
        row("elastic / static attention time", 100 * ratio, "%", "<= 102", ratio <= 1.02),
    ]
