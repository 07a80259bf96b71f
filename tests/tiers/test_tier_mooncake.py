"""Mooncake Store tier against a real mooncake_master on loopback (tcp protocol, P2P handshake)."""

from __future__ import annotations

import time

import pytest
from servers import MooncakeMaster, listening_addresses
from tierkit import Pages, run

from kvtier.errors import ConfigError
from kvtier.keys import pack
from kvtier.tiers.mooncake import MooncakeTier
from kvtier.tiers.registry import make_tier

pytest.importorskip("mooncake.store")


def make(pages: Pages, master: MooncakeMaster, **kw: object) -> MooncakeTier:
    opts = {"master": master.addr, "global_segment_size": "64MiB", "retry_after_s": 0.2, **kw}
    tier = make_tier("mooncake", "mc", opts, pages.ctx)
    assert isinstance(tier, MooncakeTier) and tier.ready
    return tier


def test_master_listens_on_loopback_only(mooncake_master: MooncakeMaster) -> None:
    addrs = listening_addresses(mooncake_master.pid)
    if not addrs:
        pytest.skip("ss not available")
    assert all(a.startswith(("127.0.0.1:", "[::1]:")) for a in addrs), addrs


def test_round_trip_bit_exact_and_upsert(mooncake_master: MooncakeMaster) -> None:
    pages = Pages()
    tier = make(pages, mooncake_master)
    keys = [Pages.key(i) for i in range(8)]
    assert run(tier, "store", pages.items(keys)).ok == tuple(keys)
    assert tier.contains([*keys, Pages.key(99)]) == [True] * 8 + [False]
    res = run(tier, "load", pages.empty([*keys, Pages.key(99)], first_slot=16))
    assert res.ok == tuple(keys) and res.failed == (Pages.key(99),)
    assert all(pages.holds(k, 16 + i) for i, k in enumerate(keys))
    # write-once keys: a second store of a key (under a read lease, even) replaces the value
    other = pages.seal(Pages.key(50), 30)[1]
    assert run(tier, "store", [(keys[0], other)]).ok == (keys[0],)
    res = run(tier, "load", pages.empty(keys[:1], first_slot=16))
    assert res.failed == (keys[0],) and tier.stats().corrupt == 1  # it names another key
    # and a leased key can still be removed
    tier.remove(keys[1:3])
    assert tier.contains(keys[1:4]) == [False, False, True]
    tier.check_integrity()
    tier.close()


def test_corrupt_object_is_a_counted_miss_and_removed(mooncake_master: MooncakeMaster) -> None:
    pages = Pages()
    tier = make(pages, mooncake_master)
    keys = [Pages.key(i) for i in range(3)]
    run(tier, "store", pages.items(keys))
    bad = bytearray(pack(pages.ctx.fingerprint, keys[1], bytes(pages.payload_for(keys[1]).numpy())))
    bad[-1] ^= 0xFF
    tier._client().upsert(tier._name(keys[1]), bytes(bad))
    res = run(tier, "load", pages.empty(keys))
    assert res.ok == (keys[0], keys[2]) and res.failed == (keys[1],)
    assert tier.contains(keys) == [True, False, True]
    assert tier.stats().corrupt == 1 and keys[1] in tier.take_removed()
    tier.check_integrity()
    tier.close()


def test_master_killed_mid_batch_then_reconnects(mooncake_master: MooncakeMaster) -> None:
    pages = Pages(num_slots=80, payload_bytes=256 << 10)
    tier = make(pages, mooncake_master)
    keys = [Pages.key(i) for i in range(32)]
    assert run(tier, "store", pages.items(keys[:8])).ok == tuple(keys[:8])
    mooncake_master.pause()  # the next batches are certainly in flight when it dies
    store_job = tier.submit_store(pages.items(keys[8:], first_slot=8))
    load_job = tier.submit_load(pages.empty(keys[:8], first_slot=40))
    assert store_job is not None and load_job is not None
    time.sleep(0.3)
    mooncake_master.kill()
    start = time.monotonic()
    results = {r.job_id: r for r in tier.wait_all(60)}
    assert time.monotonic() - start < 30, "a dead master must fail the batch, not hang"
    loaded = results[load_job]
    # whatever was reported ok is bit-exact; everything else is a miss
    assert all(pages.holds(k, 40 + keys.index(k)) for k in loaded.ok)
    assert len(loaded.ok) + len(loaded.failed) == 8
    assert len(results[store_job].ok) + len(results[store_job].failed) == 24
    assert tier.contains(keys) == [False] * 32
    assert tier.stats().errors >= 1
    mooncake_master.restart(30)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the client re-mounts its segment on its own
        res = run(tier, "store", pages.items(keys[:4]))
        if res.ok == tuple(keys[:4]):
            break
        time.sleep(1)
    else:
        raise AssertionError("no reconnect after the master came back")
    res = run(tier, "load", pages.empty(keys[:8], first_slot=40))
    assert res.ok == tuple(keys[:4])  # the rest went with the old master: misses, not stale
    assert all(pages.holds(k, 40 + i) for i, k in enumerate(keys[:4]))
    assert tier.stats().corrupt == 0
    tier.check_integrity()
    tier.close()


def test_absent_master_does_not_block_start() -> None:
    pages = Pages()
    start = time.monotonic()
    tier = make_tier(
        "mooncake", "mc", {"master": "127.0.0.1:9", "connect_timeout_s": 0.5}, pages.ctx
    )
    assert time.monotonic() - start < 5
    assert isinstance(tier, MooncakeTier) and not tier.ready
    assert tier.contains([Pages.key(0)]) == [False]
    res = run(tier, "store", pages.items([Pages.key(0)]))
    assert res.failed == (Pages.key(0),) and tier.stats().errors >= 1
    tier.check_integrity()
    tier.close()


def test_config_errors_name_the_field() -> None:
    pages = Pages()
    for opts, field in [
        ({"master": "localhost"}, "tiers.mc.master"),
        ({"protocol": "udp"}, "tiers.mc.protocol"),
        ({"global_segment_size": "big"}, "tiers.mc.global_segment_size"),
        ({"mastr": "127.0.0.1:1"}, "tiers.mc.mastr"),
    ]:
        with pytest.raises(ConfigError) as info:
            make_tier("mooncake", "mc", opts, pages.ctx)
        assert info.value.field == field
