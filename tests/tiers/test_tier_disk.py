"""Disk tier against a real directory: round trips, restart, damage, budget, back-pressure."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from tierkit import Pages, run

from kvtier.errors import ConfigError
from kvtier.keys import pack
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.registry import make_tier


def make(pages: Pages, path: Path, pages_budget: int = 64, **kw: object) -> DiskTier:
    opts = {"path": str(path), "budget": pages_budget * pages.blob_bytes(), **kw}
    tier = make_tier("disk", "disk", opts, pages.ctx)
    assert isinstance(tier, DiskTier)
    return tier


@pytest.mark.parametrize("fsync", [False, True])
def test_round_trip_bit_exact(tmp_path: Path, fsync: bool) -> None:
    pages = Pages()
    tier = make(pages, tmp_path, fsync=fsync)
    keys = [Pages.key(i) for i in range(8)]
    stored = run(tier, "store", pages.items(keys))
    assert stored.ok == tuple(keys) and not stored.failed
    assert tier.contains([*keys, Pages.key(99)]) == [True] * 8 + [False]
    loaded = run(tier, "load", pages.empty([*keys, Pages.key(99)], first_slot=16))
    assert loaded.ok == tuple(keys) and loaded.failed == (Pages.key(99),)
    assert all(pages.holds(k, 16 + i) for i, k in enumerate(keys))
    s = tier.stats()
    assert (s.pages, s.used_bytes, s.loads_ok, s.loads_failed) == (8, 8 * pages.blob_bytes(), 8, 1)
    tier.check_integrity()
    tier.close()


def test_restart_serves_every_page(tmp_path: Path) -> None:
    pages = Pages()
    keys = [Pages.key(i) for i in range(12)]
    tier = make(pages, tmp_path)
    run(tier, "store", pages.items(keys))
    tier.close()
    # a crash mid-write leaves a temporary file; a foreign file must be left alone
    sub = Path(tier.root) / keys[0].hex()[:2]
    (sub / (keys[0].hex() + ".tmp123-4")).write_bytes(b"half")
    (sub / "README").write_text("not a page")
    again = make(pages, tmp_path)
    assert again.scanned == 12
    assert again.stats().used_bytes == 12 * pages.blob_bytes()
    assert not list(sub.glob("*.tmp*")) and (sub / "README").exists()
    (sub / "README").unlink()
    res = run(again, "load", pages.empty(keys))
    assert res.ok == tuple(keys)
    assert all(pages.holds(k, i) for i, k in enumerate(keys))
    again.check_integrity()
    again.close()


def test_restart_in_a_new_process(tmp_path: Path) -> None:
    pages = Pages(fingerprint=b"F" * 16)
    keys = [Pages.key(i) for i in range(5)]
    code = f"""
import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
from tierkit import Pages, run
from kvtier.tiers.registry import make_tier
p = Pages(fingerprint=b"F" * 16)
t = make_tier("disk", "disk", {{"path": {str(tmp_path)!r}, "budget": "1MiB", "fsync": True}}, p.ctx)
r = run(t, "store", p.items([Pages.key(i) for i in range(5)]))
assert len(r.ok) == 5, r
t.close()
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    tier = make_tier("disk", "disk", {"path": str(tmp_path), "budget": "1MiB"}, pages.ctx)
    assert tier.stats().pages == 5
    assert run(tier, "load", pages.empty(keys)).ok == tuple(keys)
    assert all(pages.holds(k, i) for i, k in enumerate(keys))
    tier.check_integrity()
    tier.close()


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "extend", "foreign"])
def test_damaged_file_is_a_counted_miss_and_removed(tmp_path: Path, damage: str) -> None:
    pages = Pages()
    tier = make(pages, tmp_path)
    keys = [Pages.key(i) for i in range(3)]
    run(tier, "store", pages.items(keys))
    victim = Path(tier.root) / keys[1].hex()[:2] / keys[1].hex()
    data = bytearray(victim.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "bitflip":
        data[len(data) - 100] ^= 0x10
    elif damage == "extend":
        data += b"\0"
    else:  # same key, right size, another namespace's page
        data = bytearray(pack(b"X" * 16, keys[1], bytes(pages.ctx.payload_bytes)))
    victim.write_bytes(bytes(data))
    res = run(tier, "load", pages.empty(keys))
    assert res.ok == (keys[0], keys[2]) and res.failed == (keys[1],)
    assert pages.holds(keys[0], 0) and pages.holds(keys[2], 2)
    assert not victim.exists()
    assert tier.contains(keys) == [True, False, True]
    s = tier.stats()
    assert (s.corrupt, s.pages) == (1, 2)
    assert keys[1] in tier.take_removed()
    tier.check_integrity()
    tier.close()


def test_wrong_size_file_removed_at_start(tmp_path: Path) -> None:
    pages = Pages()
    tier = make(pages, tmp_path)
    keys = [Pages.key(i) for i in range(3)]
    run(tier, "store", pages.items(keys))
    tier.close()
    victim = Path(tier.root) / keys[2].hex()[:2] / keys[2].hex()
    os.truncate(victim, 100)
    again = make(pages, tmp_path)
    assert again.stats().pages == 2 and not victim.exists()
    again.check_integrity()
    again.close()


@pytest.mark.parametrize("policy", ["lru", "arc", "s3fifo"])
def test_budget_evicts_by_policy(tmp_path: Path, policy: str) -> None:
    pages = Pages()
    tier = make(pages, tmp_path, pages_budget=4, policy=policy)
    first = [Pages.key(i) for i in range(4)]
    run(tier, "store", pages.items(first))
    run(tier, "load", pages.empty(first[:1], first_slot=20))  # key 0 becomes recent
    more = [Pages.key(i) for i in range(4, 6)]
    res = run(tier, "store", pages.items(more, first_slot=8))
    assert res.ok == tuple(more)
    s = tier.stats()
    assert s.pages == 4 and s.used_bytes <= 4 * pages.blob_bytes()
    removed = tier.take_removed()
    assert len(removed) == 2 and set(removed) <= set(first)
    if policy == "lru":
        assert set(removed) == {first[1], first[2]}
    assert tier.contains(removed) == [False, False]
    tier.check_integrity()
    tier.close()


def test_restart_with_smaller_budget_evicts(tmp_path: Path) -> None:
    pages = Pages()
    tier = make(pages, tmp_path, pages_budget=8)
    run(tier, "store", pages.items([Pages.key(i) for i in range(8)]))
    tier.close()
    small = make(pages, tmp_path, pages_budget=3)
    assert small.stats().pages == 3
    small.check_integrity()
    small.close()


def test_back_pressure(tmp_path: Path) -> None:
    pages = Pages()
    tier = make(pages, tmp_path, max_inflight=1, threads=1)
    gate = threading.Event()
    original = tier._store_batch

    def slow(items):  # type: ignore[no-untyped-def]
        gate.wait(10)
        return original(items)

    tier._store_batch = slow  # type: ignore[method-assign]
    first = tier.submit_store(pages.items([Pages.key(0)]))
    assert first is not None
    assert tier.submit_store(pages.items([Pages.key(1)], first_slot=1)) is None
    assert tier.submit_load(pages.empty([Pages.key(0)], first_slot=2)) is None
    assert tier.stats().rejected == 2
    gate.set()
    assert [r.job_id for r in tier.wait_all(10)] == [first]
    assert tier.submit_store(pages.items([Pages.key(1)], first_slot=1)) is not None
    tier.wait_all(10)
    tier.check_integrity()
    tier.close()


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    pages = Pages()
    bad = [
        ({}, "tiers.d.path"),
        ({"path": str(tmp_path), "budget": "lots"}, "tiers.d.budget"),
        ({"path": str(tmp_path), "budget": 10}, "tiers.d.budget"),
        ({"path": str(tmp_path), "policy": "mru"}, "tiers.d.policy"),
        ({"path": str(tmp_path), "fsync": "yes"}, "tiers.d.fsync"),
        ({"path": str(tmp_path), "bugdet": "1GiB"}, "tiers.d.bugdet"),
    ]
    for opts, field in bad:
        with pytest.raises(ConfigError) as info:
            make_tier("disk", "d", opts, pages.ctx)
        assert info.value.field == field
