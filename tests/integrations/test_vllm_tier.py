"""kvtier's disk tier behind vLLM's secondary-tier hook, with vLLM's real CPU offloading spec."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import numpy as np
from vllm.v1.kv_offload.base import LookupResult, Medium, ReqContext, make_offload_key
from vllm.v1.kv_offload.config import (
    OffloadingCacheConfig,
    OffloadingConfig,
    OffloadingGroupConfig,
    OffloadingModelConfig,
    OffloadingParallelConfig,
)
from vllm.v1.kv_offload.cpu.spec import CPUOffloadingSpec
from vllm.v1.kv_offload.tiering.base import TransferJob
from vllm.v1.kv_offload.tiering.factory import SecondaryTierFactory

from kvtier.integrations.vllm.tier import KVTierSecondaryTier

CHUNK = 8192


def cpu_spec() -> CPUOffloadingSpec:
    cfg = OffloadingConfig(
        groups=(OffloadingGroupConfig(16, ("l0",), 0),),
        worker_kv_bytes_per_block=CHUNK,
        enable_kv_cache_events=True,
        extra_config={"cpu_bytes_to_use": 8 * CHUNK},
        engine_id="e",
        model=OffloadingModelConfig("tiny", "float32"),
        cache=OffloadingCacheConfig(16, 1),
        parallel=OffloadingParallelConfig(0, 1, 1, 1, 1, 1, 0, 1, None, True),
    )
    return CPUOffloadingSpec(cfg)


def finish(tier: KVTierSecondaryTier) -> list:  # type: ignore[type-arg]
    deadline = time.monotonic() + 10
    out: list = []  # type: ignore[type-arg]
    while not out and time.monotonic() < deadline:
        out = list(tier.get_finished_jobs())
        time.sleep(0.01)
    return out


def test_store_then_load_through_the_factory(tmp_path: Path) -> None:
    primary = np.zeros((8, CHUNK), np.uint8)
    rng = np.random.default_rng(0)
    primary[2] = rng.integers(0, 256, CHUNK, dtype=np.uint8)
    primary[5] = rng.integers(0, 256, CHUNK, dtype=np.uint8)
    tier = SecondaryTierFactory.create_secondary_tier(
        {
            "type": "KVTierSecondaryTier",
            "module_path": "kvtier.integrations.vllm.tier",
            "kind": "disk",
            "path": str(tmp_path / "disk"),
            "budget": "1MiB",
        },
        memoryview(primary),
        cpu_spec(),
    )
    assert isinstance(tier, KVTierSecondaryTier)
    ctx = ReqContext("r")
    keys = [make_offload_key(bytes([i]) * 32, 0) for i in range(2)]
    assert tier.lookup(keys[0], ctx) is LookupResult.MISS
    tier.submit_store(TransferJob(1, keys, np.array([2, 5]), False, ctx))
    assert tier.lookup(keys[0], ctx) is LookupResult.RETRY
    (res,) = finish(tier)
    assert (res.job_id, res.success) == (1, True)
    assert tier.lookup(keys[1], ctx) is LookupResult.HIT
    (ev,) = tier.take_events()
    assert ev.medium is Medium.STORAGE and not ev.removed and set(ev.keys) == set(keys)
    tier.submit_load(TransferJob(2, keys, np.array([6, 7]), True, ctx))
    (res,) = finish(tier)
    assert res.success and set(res.successful_keys) == set(keys)
    assert np.array_equal(primary[6], primary[2]) and np.array_equal(primary[7], primary[5])
    tier.shutdown()


def test_damaged_page_is_a_failed_load_not_wrong_bytes(tmp_path: Path) -> None:
    primary = np.full((4, CHUNK), 9, np.uint8)
    tier = KVTierSecondaryTier(
        cpu_spec(), memoryview(primary), "KVTierSecondaryTier",
        kind="disk", path=str(tmp_path / "d"), budget="1MiB",
    )  # fmt: skip
    ctx = ReqContext("r")
    key = make_offload_key(b"k" * 32, 0)
    tier.submit_store(TransferJob(1, [key], np.array([0]), False, ctx))
    finish(tier)
    files = list((tmp_path / "d").rglob("slab-*.kvt"))
    assert len(files) == 1
    data = bytearray(files[0].read_bytes())
    assert data[:4] == b"KVTB"  # the one page sits in slot 0
    data[64 + CHUNK // 2] ^= 0xFF  # a payload byte
    files[0].write_bytes(bytes(data))
    primary[1] = 0
    tier.submit_load(TransferJob(2, [key], np.array([1]), True, ctx))
    (res,) = finish(tier)
    assert not res.success and not res.successful_keys
    assert not primary[1].any()
    tier.shutdown()
