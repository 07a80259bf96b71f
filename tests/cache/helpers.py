"""Small shared helpers for cache tests: a tiny geometry and page contents derived from keys."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from kvtier.cache import Lookup, LookupStatus, TieredCache
from kvtier.geometry import KVGeometry
from kvtier.keys import Namespace, PageKey, page_keys

GEOM = KVGeometry(2, 2, 32, 16, "float32")  # 16 KiB pages
NS = Namespace("test-model", GEOM)


def keys(n: int, start: int = 0, ns: Namespace = NS) -> list[PageKey]:
    return page_keys(ns, list(range(start, start + n * GEOM.page_size)))


def content(key: PageKey) -> torch.Tensor:
    """Deterministic page bytes derived from the key, so a misplaced page is detected."""
    seed = int.from_bytes(key[:8], "little") & 0x7FFFFFFF
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (GEOM.page_bytes,), dtype=torch.uint8, generator=gen)


def store(cache: TieredCache, ks: Sequence[PageKey]) -> tuple[PageKey, ...]:
    plan = cache.prepare_store(ks)
    assert plan is not None
    for key, slot in zip(plan.keys, plan.slots):
        cache.host_pool.payload(slot).copy_(content(key))
    cache.complete_store(plan.keys)
    return plan.keys


def store_all(cache: TieredCache, ks: Sequence[PageKey], rounds: int = 50) -> None:
    """Store every key, letting background demotion free room between partial plans."""
    todo = list(ks)
    for _ in range(rounds):
        plan = cache.prepare_store(todo)
        if plan is not None:
            for key, slot in zip(plan.keys, plan.slots):
                cache.host_pool.payload(slot).copy_(content(key))
            cache.complete_store(plan.keys)
            done = set(plan.keys)
            todo = [k for k in todo if k not in done]
        cache.drain()
        if not todo:
            return
    raise AssertionError(f"{len(todo)} pages could not be stored")


def check_loaded(cache: TieredCache, ks: Sequence[PageKey]) -> None:
    plan = cache.prepare_load(ks)
    try:
        for key, slot in zip(plan.keys, plan.slots):
            assert torch.equal(cache.host_pool.payload(slot), content(key)), key.hex()
    finally:
        cache.complete_load(ks)


def settle(cache: TieredCache, ks: Sequence[PageKey], timeout: float = 10.0) -> Lookup:
    """Look up until nothing is pending any more (promotions finished)."""
    deadline = time.monotonic() + timeout
    while True:
        res = cache.lookup(ks)
        if res.status not in (LookupStatus.PENDING, LookupStatus.RETRY):
            return res
        assert time.monotonic() < deadline, f"still {res} after {timeout}s"
        time.sleep(0.005)
