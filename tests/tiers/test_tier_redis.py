"""Redis / Valkey tier against a real redis-server on a loopback port, with fault injection."""

from __future__ import annotations

import socket
import time

import pytest
from servers import RedisServer
from tierkit import Pages, run

from kvtier.errors import ConfigError
from kvtier.keys import pack
from kvtier.tiers import resp
from kvtier.tiers.redis import RedisTier
from kvtier.tiers.registry import make_tier

redis = pytest.importorskip("redis")


@pytest.fixture
def server(redis_server: RedisServer) -> RedisServer:
    return redis_server


def make(pages: Pages, srv: RedisServer, kind: str = "redis", **kw: object) -> RedisTier:
    opts = {"url": srv.url, "socket_timeout_s": 2, "connect_timeout_s": 1, "retry_after_s": 0.2,
            **kw}
    tier = make_tier(kind, kind, opts, pages.ctx)
    assert isinstance(tier, RedisTier)
    return tier


@pytest.mark.parametrize("kind", ["redis", "valkey"])
def test_round_trip_bit_exact(server: RedisServer, kind: str) -> None:
    pages = Pages()
    tier = make(pages, server, kind)
    keys = [Pages.key(i) for i in range(8)]
    assert run(tier, "store", pages.items(keys)).ok == tuple(keys)
    assert tier.contains([*keys, Pages.key(99)]) == [True] * 8 + [False]
    res = run(tier, "load", pages.empty([*keys, Pages.key(99)], first_slot=16))
    assert res.ok == tuple(keys) and res.failed == (Pages.key(99),)
    assert all(pages.holds(k, 16 + i) for i, k in enumerate(keys))
    assert tier.stats().pages == 8
    tier.remove(keys[:2])
    assert tier.contains(keys[:3]) == [False, False, True]
    tier.check_integrity()
    tier.close()


def test_ttl_expires_pages_and_hits_renew(server: RedisServer) -> None:
    pages = Pages()
    tier = make(pages, server, ttl_s=1)
    keys = [Pages.key(i) for i in range(2)]
    run(tier, "store", pages.items(keys))
    client = redis.Redis.from_url(server.url)
    assert 0 < client.ttl(b"kvtier:" + keys[0].hex().encode()) <= 1
    time.sleep(2.2)
    assert tier.contains(keys) == [False, False]
    assert run(tier, "load", pages.empty(keys)).failed == tuple(keys)
    tier.check_integrity()
    tier.close()


@pytest.mark.parametrize("damage", ["short", "bitflip", "foreign"])
def test_damaged_value_is_a_counted_miss_and_removed(server: RedisServer, damage: str) -> None:
    pages = Pages()
    tier = make(pages, server)
    keys = [Pages.key(i) for i in range(3)]
    run(tier, "store", pages.items(keys))
    client = redis.Redis.from_url(server.url)
    name = b"kvtier:" + keys[1].hex().encode()
    value = bytearray(client.get(name))
    if damage == "short":
        value = value[:-1]
    elif damage == "bitflip":
        value[-7] ^= 1
    else:
        value = bytearray(pack(b"Z" * 16, keys[1], bytes(pages.ctx.payload_bytes)))
    client.set(name, bytes(value))
    res = run(tier, "load", pages.empty(keys))
    assert res.ok == (keys[0], keys[2]) and res.failed == (keys[1],)
    assert pages.holds(keys[0], 0) and pages.holds(keys[2], 2)
    assert client.exists(name) == 0
    assert tier.stats().corrupt == 1 and keys[1] in tier.take_removed()
    tier.check_integrity()
    tier.close()


@pytest.mark.parametrize("ttl_s", [None, 60])
def test_bad_pages_mid_batch_fail_alone(server: RedisServer, ttl_s: int | None) -> None:
    """Values are read straight into their slots and verified one by one: a corrupt, short,
    missing or foreign-typed value in the middle of a batch fails only its own key, and the
    load connection stays in step for the next batch."""
    pages = Pages(num_slots=40, payload_bytes=256 << 10)  # values span many socket reads
    tier = make(pages, server, ttl_s=ttl_s)
    keys = [Pages.key(i) for i in range(12)]
    assert run(tier, "store", pages.items(keys)).ok == tuple(keys)
    client = redis.Redis.from_url(server.url)
    name = [b"kvtier:" + k.hex().encode() for k in keys]
    flipped = bytearray(client.get(name[3]))
    flipped[-100] ^= 0x40
    client.set(name[3], bytes(flipped))
    client.set(name[5], client.get(name[5])[:-1])  # short: skipped without reading it in
    client.set(name[6], client.get(name[6]) + b"x")  # long: skipped as well
    client.delete(name[8])
    client.delete(name[10])
    client.rpush(name[10], b"not a page")  # WRONGTYPE for GETEX, nil for MGET
    res = run(tier, "load", pages.empty(keys, first_slot=16))
    bad = {3, 5, 6, 8, 10}
    assert res.ok == tuple(k for i, k in enumerate(keys) if i not in bad)
    assert res.failed == tuple(keys[i] for i in sorted(bad))
    assert all(pages.holds(k, 16 + i) for i, k in enumerate(keys) if i not in bad)
    assert tier.stats().corrupt == 3  # bit flip, short, long; missing and foreign are misses
    assert set(tier.take_removed()) == {keys[3], keys[5], keys[6]}
    assert [client.exists(name[i]) for i in (3, 5, 6)] == [0, 0, 0]
    assert client.exists(name[10]) == 1  # another client's value is left alone
    assert tier.stats().errors == 0
    good = [k for i, k in enumerate(keys) if i not in bad]
    res = run(tier, "load", pages.empty(good, first_slot=16))
    assert res.ok == tuple(good) and all(pages.holds(k, 16 + i) for i, k in enumerate(good))
    tier.check_integrity()
    tier.close()


def test_load_after_restart_is_a_miss_not_a_fault(server: RedisServer) -> None:
    pages = Pages()
    tier = make(pages, server)
    keys = [Pages.key(i) for i in range(4)]
    run(tier, "store", pages.items(keys))
    assert run(tier, "load", pages.empty(keys, first_slot=8)).ok == tuple(keys)
    server.restart()  # the pooled load connection now points at a dead socket
    res = run(tier, "load", pages.empty(keys, first_slot=8))
    assert res.ok == () and res.failed == tuple(keys)  # the new server is empty: misses
    assert tier.stats().errors == 0
    assert run(tier, "store", pages.items(keys)).ok == tuple(keys)
    assert run(tier, "load", pages.empty(keys, first_slot=8)).ok == tuple(keys)
    tier.check_integrity()
    tier.close()


def test_load_retries_once_when_the_connection_drops_before_any_reply(
    server: RedisServer,
) -> None:
    """The pool hands out a connection the server has just dropped (a restart racing the
    pool's own check): the load is sent again on a fresh connection instead of failing."""
    pages = Pages()
    tier = make(pages, server)
    keys = [Pages.key(i) for i in range(4)]
    run(tier, "store", pages.items(keys))
    handed = []
    drops = [1]  # connections to drop before handing them out
    get_connection = tier._loads.get_connection

    def dropped_first() -> object:
        conn = get_connection()
        if drops[0]:
            drops[0] -= 1
            conn._sock.shutdown(socket.SHUT_RDWR)
        handed.append(conn)
        return conn

    tier._loads.get_connection = dropped_first  # type: ignore[method-assign]
    res = run(tier, "load", pages.empty(keys, first_slot=8))
    assert len(handed) == 2 and res.ok == tuple(keys)
    assert all(pages.holds(k, 8 + i) for i, k in enumerate(keys))
    assert tier.stats().errors == 0
    # a drop after the first reply bytes is not retried: the batch fails as one fault
    handed.clear()
    real_recv = resp.Replies._recv
    calls = []

    def drop_later(self: resp.Replies, into: memoryview) -> int:
        calls.append(1)
        if len(calls) == 3:
            raise ConnectionResetError("dropped mid-reply")
        return real_recv(self, into)

    resp.Replies._recv = drop_later  # type: ignore[method-assign]
    try:
        res = run(tier, "load", pages.empty(keys, first_slot=8))
    finally:
        resp.Replies._recv = real_recv  # type: ignore[method-assign]
    assert res.ok == () and len(handed) == 1 and tier.stats().errors == 1
    tier.close()


def test_server_killed_mid_batch_then_reconnects(server: RedisServer) -> None:
    pages = Pages(num_slots=64, payload_bytes=256 << 10)
    tier = make(pages, server)
    keys = [Pages.key(i) for i in range(24)]
    assert run(tier, "store", pages.items(keys[:8])).ok == tuple(keys[:8])
    # Freeze the server so the next batches are certainly in flight, then crash it.
    server.pause()
    store_job = tier.submit_store(pages.items(keys[8:], first_slot=8))
    load_job = tier.submit_load(pages.empty(keys[:8], first_slot=40))
    assert store_job is not None and load_job is not None
    time.sleep(0.3)
    assert tier.inflight() == 2
    server.kill()
    start = time.monotonic()
    results = {r.job_id: r for r in tier.wait_all(30)}
    assert time.monotonic() - start < 10, "a dead server must fail fast, not hang"
    assert results[store_job].ok == () and len(results[store_job].failed) == 16
    assert results[load_job].ok == () and len(results[load_job].failed) == 8
    # nothing that failed may look like a page: the target slots were never filled
    assert not any(pages.holds(k, 40 + i) for i, k in enumerate(keys[:8]))
    assert tier.contains(keys) == [False] * 24  # server down: a miss, not an exception
    errors = tier.stats().errors
    assert errors >= 2
    server.restart()
    time.sleep(0.3)  # past retry_after_s: the tier calls the server again
    # the server came back empty: old pages are misses, never stale data
    res = run(tier, "load", pages.empty(keys[:8], first_slot=40))
    assert res.ok == () and len(res.failed) == 8
    assert run(tier, "store", pages.items(keys[:4])).ok == tuple(keys[:4])
    res = run(tier, "load", pages.empty(keys[:4], first_slot=40))
    assert res.ok == tuple(keys[:4])
    assert all(pages.holds(k, 40 + i) for i, k in enumerate(keys[:4]))
    assert tier.stats().corrupt == 0
    tier.check_integrity()
    tier.close()


def test_hung_server_times_out_then_fails_fast(server: RedisServer) -> None:
    pages = Pages()
    tier = make(pages, server, socket_timeout_s=0.5, retry_after_s=3)
    run(tier, "store", pages.items([Pages.key(0)]))
    server.pause()
    try:
        start = time.monotonic()
        res = run(tier, "load", pages.empty([Pages.key(0)], first_slot=4))
        assert res.failed == (Pages.key(0),) and time.monotonic() - start < 5
        # after one timeout the tier answers at once instead of waiting on the server again
        start = time.monotonic()
        assert tier.contains([Pages.key(0)]) == [False]
        assert time.monotonic() - start < 0.1
    finally:
        server.resume()
    time.sleep(3)
    res = run(tier, "load", pages.empty([Pages.key(0)], first_slot=4))
    assert res.ok == (Pages.key(0),) and pages.holds(Pages.key(0), 4)
    tier.check_integrity()
    tier.close()


def test_config_errors_name_the_field() -> None:
    pages = Pages()
    for opts, field in [
        ({"url": "http://x"}, "tiers.r.url"),
        ({"ttl_s": -1}, "tiers.r.ttl_s"),
        ({"socket_timeout_s": "soon"}, "tiers.r.socket_timeout_s"),
        ({"max_inflight": 0}, "tiers.r.max_inflight"),
        ({"tll_s": 5}, "tiers.r.tll_s"),
        ({"retry_after_s": 0}, "tiers.r.retry_after_s"),
    ]:
        with pytest.raises(ConfigError) as info:
            make_tier("redis", "r", opts, pages.ctx)
        assert info.value.field == field
