"""The worker-side transfer worker on CPU tensors shaped like vLLM's, and the shared pool."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import torch
from vllm.v1.kv_offload.base import (
    CanonicalKVCacheRef,
    CanonicalKVCaches,
    CanonicalKVCacheTensor,
    GPULoadStoreSpec,
)
from vllm.v1.kv_offload.config import (
    OffloadingCacheConfig,
    OffloadingConfig,
    OffloadingGroupConfig,
    OffloadingModelConfig,
    OffloadingParallelConfig,
)

from kvtier.cache import CacheConfig
from kvtier.errors import ConfigError
from kvtier.geometry import KVGeometry
from kvtier.integrations.vllm import common
from kvtier.integrations.vllm.common import KVTierLoadStoreSpec
from kvtier.integrations.vllm.worker import KVTierOffloadingWorker
from kvtier.memory.host_pool import HostPool

H, D, BS, NB = 2, 32, 16, 12


def canonical_caches(layers: list[torch.Tensor], groups: list[list[int]]) -> CanonicalKVCaches:
    tensors = []
    for t in layers:
        view = t.view(t.shape[0], -1).view(torch.int8)
        tensors.append(CanonicalKVCacheTensor(view, view.shape[1]))
    refs = [[CanonicalKVCacheRef(i, tensors[i].page_size_bytes) for i in g] for g in groups]
    return CanonicalKVCaches(tensors, refs)


def run(worker: KVTierOffloadingWorker, job: int, store: bool, gpu, host) -> None:  # type: ignore[no-untyped-def]
    if store:
        worker.submit_store(job, gpu, host)
    else:
        worker.submit_load(job, host, gpu)
    done = worker.get_finished()
    assert [(r.job_id, r.success) for r in done] == [(job, True)]


def test_cpu_layout_pages_round_trip() -> None:
    torch.manual_seed(0)
    layers = [torch.randn(NB, H, BS, 2 * D) for _ in range(2)]  # vLLM-CPU: [blocks, H, bs, 2D]
    page = KVGeometry(2, 1, H * D, BS, "float32")
    pool = HostPool(4, page.page_bytes, pin=False)
    w = KVTierOffloadingWorker(canonical_caches(layers, [[0, 1]]), pool, page, BS, canonical=False)
    run(w, 1, True, GPULoadStoreSpec([3, 5], [2], [0]), KVTierLoadStoreSpec([2, 0], [0, 0]))
    for t in layers:
        t[7].zero_()
        t[8].zero_()
    run(w, 2, False, GPULoadStoreSpec([8, 7], [2], [0]), KVTierLoadStoreSpec([2, 0], [0, 0]))
    for t in layers:
        assert torch.equal(t[8], t[3]) and torch.equal(t[7], t[5])
    w.shutdown()


def test_canonical_pages_of_two_blocks_and_a_partial_load() -> None:
    torch.manual_seed(1)
    layers = [torch.randn(NB, 2, BS, H, D) for _ in range(2)]  # CUDA NHD: [blocks, 2, bs, H, D]
    page = KVGeometry(2, 1, H * D, 2 * BS, "float32")
    pool = HostPool(4, page.page_bytes, pin=False)
    w = KVTierOffloadingWorker(canonical_caches(layers, [[0, 1]]), pool, page, BS, canonical=True)
    gpu = GPULoadStoreSpec([1, 4, 6, 2], [4], [0])
    run(w, 1, True, gpu, KVTierLoadStoreSpec([3, 0], [0, 0]))
    # Slot 3 holds kvtier's canonical page: [L][kv][S][H][D] over blocks 1 and 4.
    want = torch.cat(
        [torch.cat([t[1, kv], t[4, kv]]).reshape(-1) for t in layers for kv in range(2)]
    )
    got = pool.payload(3).view(torch.float32)
    assert torch.equal(got, want)
    # The engine already holds the page's first block: load only the second one, into block 9.
    run(w, 2, False, GPULoadStoreSpec([9], [1], [1]), KVTierLoadStoreSpec([3], [0]))
    for t in layers:
        assert torch.equal(t[9], t[4])
    full = GPULoadStoreSpec([10, 11, 7, 8], [4], [0])
    run(w, 3, False, full, KVTierLoadStoreSpec([3, 0], [0, 0]))
    for t in layers:
        assert torch.equal(t[10], t[1]) and torch.equal(t[11], t[4])
        assert torch.equal(t[7], t[6]) and torch.equal(t[8], t[2])
    w.shutdown()


def test_hybrid_groups_share_one_job() -> None:
    torch.manual_seed(2)
    layers = [torch.randn(NB, H, BS, 2 * D) for _ in range(3)]
    page = KVGeometry(2, 1, H * D, BS, "float32")  # the largest group has two layers
    pool = HostPool(4, page.page_bytes, pin=False)
    kv = canonical_caches(layers, [[0, 1], [2]])
    w = KVTierOffloadingWorker(kv, pool, page, BS, canonical=False)
    run(w, 5, True, GPULoadStoreSpec([3, 5, 4], [2, 1], [0, 0]),
        KVTierLoadStoreSpec([0, 1, 2], [0, 0, 1]))  # fmt: skip
    before = [t.clone() for t in layers]
    for t in layers:
        t[9:].zero_()
    run(w, 6, False, GPULoadStoreSpec([9, 10, 11], [2, 1], [0, 0]),
        KVTierLoadStoreSpec([0, 1, 2], [0, 0, 1]))  # fmt: skip
    assert torch.equal(layers[0][9], before[0][3]) and torch.equal(layers[1][10], before[1][5])
    assert torch.equal(layers[2][11], before[2][4])
    # Group 1 never touched group 0's layers beyond its own blocks.
    assert torch.equal(layers[0][11], torch.zeros_like(layers[0][11]))
    w.shutdown()


def offloading_config(
    run_id: str, world: int = 1, bytes_per_block: int = 16384
) -> OffloadingConfig:
    return OffloadingConfig(
        groups=(OffloadingGroupConfig(BS, ("l0", "l1"), 0),),
        worker_kv_bytes_per_block=bytes_per_block,
        enable_kv_cache_events=False,
        extra_config={"kvtier_run_id": run_id, "kvtier_config": {"host": {"budget": "1MiB"}}},
        engine_id="e0",
        model=OffloadingModelConfig("tiny", "float32"),
        cache=OffloadingCacheConfig(BS, 2),
        parallel=OffloadingParallelConfig(0, world, world, 1, 1, 1, 0, 1, None, True),
    )


def test_page_geometry_and_namespace() -> None:
    cfg = offloading_config("g")
    g = common.page_geometry(cfg)
    assert (g.num_layers, g.num_kv_heads, g.head_size, g.page_size) == (2, 1, 64, 2 * BS)
    assert g.page_bytes == 2 * cfg.worker_kv_bytes_per_block
    ns = common.namespace(cfg, common.load_cache_config(cfg))
    assert ns.model_id == "tiny" and ("block_layout", "cpu_hkvsd") in ns.extra
    with pytest.raises(ConfigError, match="world_size"):
        common.page_geometry(offloading_config("g", world=2))
    with pytest.raises(ConfigError, match="worker_kv_bytes_per_block"):
        common.page_geometry(offloading_config("g", bytes_per_block=1000))


def test_shared_pool_second_opener_unlinks(tmp_path: Path) -> None:
    cfg = offloading_config(f"test-{uuid.uuid4().hex}")
    cc: CacheConfig = common.load_cache_config(cfg)
    path = common.pool_path(cfg)
    first = common.open_pool(cfg, cc, pin=False)
    assert path.exists()
    second = common.open_pool(cfg, cc, pin=False)
    assert not path.exists()  # both mapped: the name is gone, the memory stays
    assert first.num_slots == second.num_slots > 0
    first.payload(1).fill_(7)
    assert int(second.payload(1)[5]) == 7
    first.close()
    second.close()
    assert not os.path.exists(path)
