"""kvtier policies inside vLLM's own CPU offloading manager (its cache-policy hook)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from vllm.v1.kv_offload.base import LookupResult, ReqContext, make_offload_key
from vllm.v1.kv_offload.cpu.manager import CPUOffloadingManager

from kvtier.integrations.vllm import POLICY_MODULE
from kvtier.integrations.vllm.policy import KVTierCachePolicy


def manager(policy: str, chunks: int = 4) -> CPUOffloadingManager:
    return CPUOffloadingManager(
        num_chunks=chunks, cache_policy=policy, cache_policy_module_path=POLICY_MODULE,
        enable_events=True,
    )  # fmt: skip


def key(i: int) -> bytes:
    return make_offload_key(bytes([i]) * 32, 0)


def store(m: CPUOffloadingManager, keys: list[bytes], ctx: ReqContext) -> list[bytes]:
    out = m.prepare_store(keys, ctx)  # type: ignore[arg-type]
    assert out is not None
    m.complete_store(out.keys_to_store, ctx)
    return list(out.evicted_keys)


@pytest.mark.parametrize("policy", ["KVTierLRU", "KVTierARC", "KVTierS3FIFO"])
def test_policy_runs_vllms_cpu_manager(policy: str) -> None:
    m = manager(policy)
    assert isinstance(m._policy, KVTierCachePolicy)
    ctx = ReqContext("r")
    store(m, [key(i) for i in range(4)], ctx)
    assert all(m.lookup(key(i), ctx) is LookupResult.HIT for i in range(4))  # type: ignore[arg-type]
    # A chunk being read is never evicted.
    m.prepare_load([key(0)], ctx)  # type: ignore[list-item]
    evicted = store(m, [key(10), key(11)], ctx)
    assert len(evicted) == 2 and key(0) not in evicted
    assert m.lookup(key(0), ctx) is LookupResult.HIT  # type: ignore[arg-type]
    # Everything left is read or protected: the store is refused, nothing changes.
    m.prepare_load([key(10), key(11)], ctx)  # type: ignore[list-item]
    remaining = [k for k in (key(1), key(2), key(3)) if k not in evicted]
    for k in remaining:
        m.prepare_load([k], ctx)  # type: ignore[list-item]
    assert m.prepare_store([key(20)], ctx) is None  # type: ignore[list-item]
    m.complete_load([key(0)], ctx)  # type: ignore[list-item]
    assert store(m, [key(20)], ctx) == [key(0)]


def test_lru_order_and_protection() -> None:
    m = manager("KVTierLRU")
    ctx = ReqContext("r")
    store(m, [key(i) for i in range(4)], ctx)
    m.touch([key(0)], ctx)  # type: ignore[list-item]
    assert store(m, [key(5)], ctx) == [key(1)]
    # Keys offered in the same store are protected even when they are the oldest.
    assert store(m, [key(2), key(6)], ctx) == [key(3)]
