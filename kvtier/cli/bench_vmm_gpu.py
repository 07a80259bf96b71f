"""The GPU rows of `kvtier bench vmm` (imported only when CUDA is available).

Sections (each recorded on its own, see `bench_vmm.Recorder`): CUDA allocation timings, a GPU0
kernel reading pages that live on GPU1 against the peer memcpy ceiling, and SDPA decode over
elastic vs static KV (`bench_vmm_attn`).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from typing import Any

from kvtier.cli.bench_vmm import Recorder, Row, alloc_rows, row
from kvtier.memory.elastic import ElasticPool
from kvtier.memory.elastic_layout import ElasticLayout, PoolLimits
from kvtier.memory.vmm_backend import PAGE_BYTES
from kvtier.memory.vmm_cuda import CudaVmmBackend


def run_gpu(rec: Recorder, args: argparse.Namespace) -> None:
    """Record every GPU section into `rec`; a failing section does not stop the next one."""
    import torch

    from kvtier.cli.bench_vmm_attn import attention_rows

    torch.cuda.init()
    opened: list[CudaVmmBackend] = []

    def start() -> Iterator[Row]:
        opened.append(CudaVmmBackend())
        return iter(())

    if not rec.section("cuda backend", start):
        return
    be = opened[0]
    rec.section("cuda alloc", lambda: alloc_rows(be, args.pages, "cuda"))
    if be.device_count() >= 2 and be.can_access_peer(0, 1):
        rec.section("peer read", lambda: peer_rows(be, args.peer_mib << 20))
    else:
        rec.add(row("peer read", None, "", "", None, "skipped: needs 2 peer-capable GPUs"))
    rec.section("attention", lambda: attention_rows(be, args.attn_seqs, args.attn_tokens))
    rec.section("cuda backend close", lambda: _close(be))


def _close(be: CudaVmmBackend) -> Iterator[Row]:
    be.close()
    return iter(())


def wall(fn: Any, iters: int) -> float:
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


def peer_rows(be: CudaVmmBackend, nbytes: int) -> Iterator[Row]:
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
        src = be.tensor(pool.base, (n,), torch.float16, 0)  # checked: a view, not a copy
        # only GPU0 has access to the pool's range: fill it from GPU0, never via GPU1
        peer = torch.randn(n, device="cuda:1", dtype=torch.float16)
        src.copy_(peer.to("cuda:0"))
        dst = torch.empty(n, device="cuda:0", dtype=torch.float16)
        torch.neg(src, out=dst)
        if not torch.equal(dst, -peer.to("cuda:0")):
            raise RuntimeError("kernel read of peer pages returned wrong data")
        iters = 20
        t_memcpy = wall(lambda: dst.copy_(peer), iters)
        yield row("peer memcpy GPU1->GPU0 (ceiling)", nbytes / t_memcpy / 1e9, "GB/s", "-", None)
        t_kernel = wall(lambda: torch.neg(src, out=dst), iters)
        yield row("GPU0 kernel reading GPU1 pages (neg: read+local write)",
                  nbytes / t_kernel / 1e9, "GB/s", "-", None)
        t_sum = wall(lambda: src.sum(dtype=torch.float32), iters)
        yield row("GPU0 kernel reading GPU1 pages (sum: read only)", nbytes / t_sum / 1e9,
                  "GB/s", "-", None)
        ratio = t_memcpy / min(t_kernel, t_sum)
        yield row("peer-page kernel read / peer memcpy", 100 * ratio, "%", ">= 90", ratio >= 0.9)
        pool.free(blocks)
    finally:
        pool.close()
