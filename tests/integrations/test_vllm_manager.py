"""The scheduler-side manager against a real TieredCache (host + disk), without an engine."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from vllm.v1.kv_offload.base import (
    LookupResult,
    Medium,
    ReqContext,
    ScheduleEndContext,
    make_offload_key,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvtier.cache import TieredCache
from kvtier.geometry import KVGeometry
from kvtier.integrations.vllm.common import KVTierLoadStoreSpec
from kvtier.integrations.vllm.manager import KVTierOffloadingManager, stats_doc
from kvtier.keys import Namespace
from kvtier.memory.host_pool import HostPool

GEO = KVGeometry(2, 1, 64, 32, "float32")
NS = Namespace("tiny", GEO, extra=(("engine", "vllm"),))


def make(tmp_path: Path, slots: int, *, disk: bool = True) -> KVTierOffloadingManager:
    cfg: dict[str, object] = {"host": {"budget": "1GiB"}, "headroom": 0.0}
    if disk:
        cfg["tiers"] = [{"kind": "disk", "path": str(tmp_path / "disk"), "budget": "64MiB"}]
    pool = HostPool(slots, GEO.page_bytes, pin=False)
    cache = TieredCache(cfg, NS, host_pool=pool)
    return KVTierOffloadingManager(
        cache, NS, {0: 0, 3: 1}, tier_kinds={"disk": "disk"}, emit_events=True
    )


def vkeys(n: int, group: int = 0, tag: bytes = b"h") -> list[bytes]:
    return [make_offload_key(tag + bytes([i]) * 31, group) for i in range(n)]


def store(m: KVTierOffloadingManager, keys: list[bytes], ctx: ReqContext) -> None:
    out = m.prepare_store(keys, ctx)
    assert out is not None
    assert isinstance(out.store_spec, KVTierLoadStoreSpec)
    m.complete_store(out.keys_to_store, ctx)


def settle(m: KVTierOffloadingManager) -> None:
    m.cache.drain()
    m.on_schedule_end(ScheduleEndContext((), ()))


def test_store_then_hit_and_load(tmp_path: Path) -> None:
    m = make(tmp_path, 8)
    ctx = ReqContext("r1")
    keys = vkeys(3) + vkeys(2, group=3)
    assert m.lookup(keys[0], ctx) is LookupResult.MISS
    out = m.prepare_store(keys, ctx)
    assert out is not None and out.keys_to_store == keys
    spec = out.store_spec
    assert isinstance(spec, KVTierLoadStoreSpec)
    assert spec.groups == [0, 0, 0, 1, 1] and len(set(spec.slots)) == 5
    # Not yet complete: another request is told to retry, not to miss.
    assert m.lookup(keys[0], ReqContext("r2")) is LookupResult.RETRY
    m.complete_store(set(keys), ctx)
    assert all(m.lookup(k, ctx) is LookupResult.HIT for k in keys)
    load = m.prepare_load(keys[:2], ctx)
    assert isinstance(load, KVTierLoadStoreSpec)
    assert load.slots == spec.slots[:2]
    assert m.get_load_source(keys[0], ctx) is CacheHitSource.HOST
    m.complete_load(set(keys[:2]), ctx)
    # Already cached: nothing to write.
    again = m.prepare_store(keys, ctx)
    assert again is not None and again.keys_to_store == []
    settle(m)
    events = list(m.take_events())
    stored = [e for e in events if e.medium is Medium.CPU and not e.removed]
    assert stored and set(stored[0].keys) == set(keys)
    assert any(e.medium is Medium.STORAGE and e.ownership == "disk" for e in events)
    m.cache.check_integrity()
    assert m.cache.pins() == 0
    m.shutdown()


def test_eviction_reports_vllm_keys(tmp_path: Path) -> None:
    m = make(tmp_path, 2, disk=False)
    ctx = ReqContext("r")
    store(m, vkeys(2, tag=b"a"), ctx)
    out = m.prepare_store(vkeys(2, tag=b"b"), ctx)
    assert out is not None
    assert set(out.evicted_keys) == set(vkeys(2, tag=b"a"))
    removed = [e for e in m.take_events() if e.removed]
    assert removed and set(removed[0].keys) == set(vkeys(2, tag=b"a"))
    m.shutdown()


def scan(m: KVTierOffloadingManager, keys: list[bytes], ctx: ReqContext) -> int | None:
    """vLLM's maximal-prefix lookup: the hit count, or None when it must ask again."""
    hits, defer = 0, False
    for k in keys:
        r = m.lookup(k, ctx)
        if r is LookupResult.MISS:
            break
        if r in (LookupResult.HIT_PENDING, LookupResult.RETRY):
            defer = True
        if r is not LookupResult.RETRY:
            hits += 1
    return None if defer else hits


def test_promotion_from_disk_converges_with_a_small_host_tier(tmp_path: Path) -> None:
    m = make(tmp_path, 4)
    ctx = ReqContext("w")
    prefix = vkeys(4, tag=b"p")
    store(m, prefix, ctx)
    settle(m)  # cascaded to disk
    store(m, vkeys(4, tag=b"f"), ctx)  # evicts the prefix from host memory
    settle(m)
    req = ReqContext("again")
    result = scan(m, prefix, req)
    assert result is None  # promotions started: vLLM asks again later
    assert m.has_pending_work()
    deadline = time.monotonic() + 10
    while result is None and time.monotonic() < deadline:
        settle(m)
        result = scan(m, prefix, req)
    # The host tier holds exactly the prefix: the re-scans must not evict what they promoted.
    assert result == 4
    m.prepare_load(prefix, req)
    assert {m.get_load_source(k, req) for k in prefix} == {CacheHitSource.DISK}
    m.complete_load(set(prefix), req)
    doc = stats_doc(m.stats())
    assert doc["hits"]["disk"] == 4 and doc["hits"]["host"] == 0
    m.cache.check_integrity()
    m.shutdown()


def test_reset_cache_returns_the_leases_of_forgotten_jobs(tmp_path: Path) -> None:
    m = make(tmp_path, 4, disk=False)
    ctx = ReqContext("r")
    done = vkeys(2, tag=b"d")
    store(m, done, ctx)
    m.prepare_load(done, ctx)  # a load vLLM will never complete
    out = m.prepare_store(vkeys(2, tag=b"w"), ctx)  # a store it will never complete
    assert out is not None and m.cache.pins() == 4
    m.reset_cache()
    assert m.cache.pins() == 0
    m.cache.check_integrity()
    assert m.lookup(done[0], ctx) is LookupResult.HIT  # stored pages stay valid
    assert m.lookup(vkeys(1, tag=b"w")[0], ctx) is LookupResult.MISS  # aborted, not stuck
    m.shutdown()


def test_request_tier_filter_is_honoured(tmp_path: Path) -> None:
    from vllm.v1.kv_offload.base import TierFilter, TierMatcher

    m = make(tmp_path, 2)
    ctx = ReqContext("w")
    in_host, on_disk = vkeys(1, tag=b"h"), vkeys(2, tag=b"x")
    store(m, on_disk, ctx)
    settle(m)
    store(m, in_host + vkeys(1, tag=b"y"), ctx)  # pushes on_disk out of host memory
    settle(m)
    host_only = ReqContext("h", load_tier_filter=TierFilter((TierMatcher(Medium.CPU),)))
    assert m.lookup(in_host[0], host_only) is LookupResult.HIT
    assert m.lookup(on_disk[0], host_only) is LookupResult.MISS
    nothing = ReqContext("n", load_tier_filter=TierFilter(()))
    assert m.lookup(in_host[0], nothing) is LookupResult.MISS
    assert m.lookup(on_disk[1], ReqContext("a")) is LookupResult.HIT_PENDING
    m.shutdown()


def test_one_lookup_promotes_the_rest_of_the_request(tmp_path: Path) -> None:
    m = make(tmp_path, 8)
    ctx = ReqContext("w")
    prefix = vkeys(5, tag=b"p")
    store(m, prefix, ctx)
    settle(m)
    store(m, vkeys(8, tag=b"f"), ctx)  # the prefix now lives on disk only
    settle(m)
    req = ReqContext("again")
    for i, k in enumerate(prefix):  # what vLLM records as it hashes the prompt
        req.set_offload_key_position(k, (i + 1) * 32)
    assert m.lookup(prefix[0], req) is LookupResult.HIT_PENDING
    settle(m)
    # Pages 1..4 were never asked about: the first lookup's promotion brought them up.
    assert all(m.lookup(k, ReqContext("other")) is LookupResult.HIT for k in prefix)
    m.cache.check_integrity()
    m.shutdown()
