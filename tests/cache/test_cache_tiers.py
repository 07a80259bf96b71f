"""The cache over real secondary tiers: disk, redis-server and mooncake_master on loopback.

Cascade, demotion and promotion must show up in events; a server killed under the cache must
turn into counted misses while the other tiers keep serving; nothing loaded is ever wrong.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from servers import MooncakeMaster, RedisServer

from kvtier.cache import EventKind, Lookup, LookupStatus, TieredCache

from .helpers import NS, check_loaded, keys, settle, store_all

SLOT = 20480  # one 16 KiB page + header, 4 KiB aligned


def redis_tier(srv: RedisServer, mode: str) -> dict[str, Any]:
    return {"kind": "redis", "url": srv.url, "mode": mode, "socket_timeout_s": 1,
            "connect_timeout_s": 0.5, "retry_after_s": 0.2}


def disk_tier(tmp_path: Path, mode: str = "write_through") -> dict[str, Any]:
    return {"kind": "disk", "path": str(tmp_path / "disk"), "budget": "4MiB", "mode": mode}


def make(host_slots: int, tiers: list[dict[str, Any]]) -> TieredCache:
    return TieredCache({"host": {"budget": host_slots * SLOT}, "tiers": tiers}, NS)


def events(cache: TieredCache) -> set[tuple[EventKind, str]]:
    return {(e.kind, e.tier) for e in cache.take_events()}


def settle_all(cache: TieredCache, ks: list[bytes], rounds: int = 5) -> Lookup:
    """Look up until promotion stops making progress. In demote mode the host's free slots can
    all be tied up in demotions still in flight; the cache then answers with fewer hits rather
    than waiting, so wait for the tiers (drain) and ask again."""
    res = settle(cache, ks, timeout=30)
    for _ in range(rounds):
        if res.hits == len(ks):
            break
        cache.drain()
        res = settle(cache, ks, timeout=30)
    return res


def finish(cache: TieredCache) -> None:
    cache.drain()
    cache.check_integrity()
    assert cache.pins() == 0
    cache.close()


def test_cascade_down_disk_and_redis(tmp_path: Path, redis_server: RedisServer) -> None:
    import redis

    cache = make(8, [disk_tier(tmp_path), redis_tier(redis_server, "write_through")])
    ks = keys(4)
    store_all(cache, ks)
    got = events(cache)
    assert {(EventKind.STORED, t) for t in ("host", "disk", "redis")} <= got
    client = redis.Redis.from_url(redis_server.url)
    assert client.exists(*[b"kvtier:" + k.hex().encode() for k in ks]) == 4
    assert cache.stats().tier("disk").pages == 4
    finish(cache)


def test_demote_into_redis_then_promote_back(redis_server: RedisServer) -> None:
    cache = make(8, [redis_tier(redis_server, "demote")])
    ks = keys(16)
    store_all(cache, ks)  # host holds at most 8: the oldest were demoted on eviction
    got = events(cache)
    assert (EventKind.DEMOTED, "redis") in got and (EventKind.STORED, "redis") not in got
    first = cache.lookup(ks[:4])
    assert first.status == LookupStatus.PENDING and first.pending >= 1
    res = settle_all(cache, ks[:4])
    assert res.hits == 4
    check_loaded(cache, ks[:4])
    assert (EventKind.PROMOTED, "redis") in events(cache)
    stats = cache.stats()
    assert stats.tier("redis").hits >= 1 and stats.promotions >= 1
    finish(cache)


def test_redis_killed_cache_serves_from_disk_and_reconnects(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    cache = make(4, [redis_tier(redis_server, "write_through"), disk_tier(tmp_path)])
    ks = keys(8)
    store_all(cache, ks)
    events(cache)
    redis_server.kill()
    res = settle(cache, ks[:4])  # host evicted these; redis is gone; the disk has them
    assert res.hits == 4
    check_loaded(cache, ks[:4])
    got = events(cache)
    assert (EventKind.PROMOTED, "disk") in got and (EventKind.PROMOTED, "redis") not in got
    assert cache.stats().tier("redis").errors >= 1
    # stores still complete (the disk takes them) while redis is down
    more = keys(2, start=10_000)
    store_all(cache, more)
    assert (EventKind.STORED, "disk") in events(cache)
    redis_server.restart()
    again = keys(2, start=20_000)
    deadline = time.monotonic() + 10
    fresh = 30_000
    while (EventKind.STORED, "redis") not in events(cache):
        assert time.monotonic() < deadline, "redis tier did not reconnect"
        fresh += 100  # a new page each round: only new pages cascade
        store_all(cache, keys(1, start=fresh))
        time.sleep(0.05)
    store_all(cache, again)
    finish(cache)


def test_redis_killed_mid_promotion_never_serves_wrong_pages(redis_server: RedisServer) -> None:
    from kvtier.geometry import KVGeometry
    from kvtier.keys import Namespace, page_keys

    big = Namespace("test-model-big", KVGeometry(4, 8, 128, 16, "float32"))  # 1 MiB pages
    slot = big.geometry.page_bytes + 4096
    tiers = [redis_tier(redis_server, "demote")]
    cache = TieredCache({"host": {"budget": 24 * slot}, "tiers": tiers}, big)
    ks = page_keys(big, list(range(48 * 16)))
    plan_keys: list[bytes] = []
    for i in range(0, 48, 8):  # store 48 pages through a 24-page host tier: half are demoted
        plan = cache.prepare_store(ks[i : i + 8])
        assert plan is not None
        for key, s in zip(plan.keys, plan.slots):
            cache.host_pool.payload(s).fill_(key[0])
        cache.complete_store(plan.keys)
        plan_keys += plan.keys
        cache.drain()
    first = cache.lookup(ks)
    redis_server.kill()  # while the promotion batch streams out of redis
    assert first.status == LookupStatus.PENDING
    res = settle(cache, ks, timeout=30)
    assert res.status in (LookupStatus.HIT, LookupStatus.MISS)
    plan = cache.prepare_load(ks[: res.hits])
    try:
        for key, s in zip(plan.keys, plan.slots):
            assert bool((cache.host_pool.payload(s) == key[0]).all()), "wrong page served"
    finally:
        cache.complete_load(plan.keys)
    stats = cache.stats()
    assert stats.tier("redis").corrupt == 0
    if stats.promotion_failures:
        assert stats.tier("redis").errors >= 1
    finish(cache)


def test_mooncake_demote_promote_and_master_loss(
    tmp_path: Path, mooncake_master: MooncakeMaster
) -> None:
    master = mooncake_master
    mc = {"kind": "mooncake", "master": master.addr, "global_segment_size": "32MiB",
          "mode": "demote"}
    cache = make(8, [mc, disk_tier(tmp_path, "demote")])
    ks = keys(16)  # host holds at most 8 (less its headroom): the oldest go to mooncake
    store_all(cache, ks)
    assert (EventKind.DEMOTED, "mooncake") in events(cache)
    assert settle_all(cache, ks[:4]).hits == 4
    check_loaded(cache, ks[:4])
    assert (EventKind.PROMOTED, "mooncake") in events(cache)
    master.kill()
    # mooncake's pages are gone with it; the disk below still serves its copies
    res = settle_all(cache, ks[4:])
    assert res.hits >= 4
    check_loaded(cache, ks[4 : 4 + res.hits])
    assert (EventKind.PROMOTED, "disk") in events(cache)
    finish(cache)
