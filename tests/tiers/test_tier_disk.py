"""Disk tier against real slab files: round trips, vectored runs, restart, damage, budget,
back-pressure."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tierkit import Pages, run, slot_bytes, slot_file

from kvtier.errors import ConfigError
from kvtier.keys import pack
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.registry import make_tier


def make(pages: Pages, path: Path, pages_budget: int = 64, **kw: object) -> DiskTier:
    opts = {"path": str(path), "budget": pages_budget * slot_bytes(pages), **kw}
    tier = make_tier("disk", "disk", opts, pages.ctx)
    assert isinstance(tier, DiskTier)
    return tier


def header_at(tier: DiskTier, key: bytes) -> bytes:
    path, off = slot_file(tier, key)
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(64)


@pytest.mark.parametrize("fsync", [False, True])
def test_round_trip_bit_exact(tmp_path: Path, fsync: bool) -> None:
    pages = Pages()
    tier = make(pages, tmp_path, fsync=fsync, slab_size=5 * slot_bytes(pages))  # several slabs
    keys = [Pages.key(i) for i in range(8)]
    stored = run(tier, "store", pages.items(keys))
    assert stored.ok == tuple(keys) and not stored.failed
    assert tier.contains([*keys, Pages.key(99)]) == [True] * 8 + [False]
    loaded = run(tier, "load", pages.empty([*keys, Pages.key(99)], first_slot=16))
    assert loaded.ok == tuple(keys) and loaded.failed == (Pages.key(99),)
    assert all(pages.holds(k, 16 + i) for i, k in enumerate(keys))
    s = tier.stats()
    assert (s.pages, s.used_bytes, s.loads_ok, s.loads_failed) == (8, 8 * pages.blob_bytes(), 8, 1)
    assert len(list(Path(tier.root).glob("slab-*.kvt"))) == -(-64 // 5)
    tier.check_integrity()
    tier.close()


def test_a_batch_lands_in_adjacent_slots_and_loads_in_one_call(tmp_path: Path) -> None:
    pages = Pages()
    tier = make(pages, tmp_path, slab_size=4 * slot_bytes(pages))
    keys = [Pages.key(i) for i in range(6)]
    run(tier, "store", pages.items(keys))
    assert sorted(tier._slot[k] for k in keys) == list(range(6))
    # shuffled order, one slab boundary (4 slots per slab): two vectored reads
    targets = pages.empty([keys[i] for i in (5, 0, 3, 1, 4, 2)], first_slot=16)
    pairs = [(buf, tier._slot[k]) for k, buf in targets]
    runs = tier._runs("READ", pairs)
    assert [len([v for v in r.iov if len(v) == pages.blob_bytes()]) for r in runs] == [4, 2]
    assert all(r.nbytes == len(r.iov) // 2 * slot_bytes(pages) + pages.blob_bytes()
               for r in runs)
    res = run(tier, "load", targets)
    assert set(res.ok) == set(keys)
    assert all(pages.holds(k, 16 + i) for i, k in enumerate(k for k, _ in targets))
    # a gap (a page not asked for) splits a run; header-sized reads never join one
    assert len(tier._runs("READ", [p for p in pairs if p[1] != tier._slot[keys[1]]])) == 3
    head = memoryview(bytearray(64))
    assert len(tier._runs("READ", [(head, 0), (head, 1), (head, 2)])) == 3
    tier.check_integrity()
    tier.close()


def test_restart_serves_every_page(tmp_path: Path) -> None:
    pages = Pages()
    keys = [Pages.key(i) for i in range(12)]
    tier = make(pages, tmp_path)
    run(tier, "store", pages.items(keys))
    with pytest.raises(ConfigError, match="no other live tier"):
        make(pages, tmp_path)  # the directory is locked while the tier lives
    tier.remove(keys[:2])  # removed pages must not come back
    tier.close()
    (Path(tier.root) / "README").write_text("not a page")  # foreign files are left alone
    again = make(pages, tmp_path)
    assert again.scanned == 10
    assert again.stats().used_bytes == 10 * pages.blob_bytes()
    assert (Path(tier.root) / "README").exists()
    res = run(again, "load", pages.empty(keys))
    assert res.ok == tuple(keys[2:]) and res.failed == tuple(keys[:2])
    assert all(pages.holds(k, i) for i, k in enumerate(keys) if i >= 2)
    again.check_integrity()
    again.close()


def test_restart_in_a_new_process(tmp_path: Path) -> None:
    pages = Pages(fingerprint=b"F" * 16)
    keys = [Pages.key(i) for i in range(5)]
    code = f"""
import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
from tierkit import Pages, run, slot_bytes, slot_file
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


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "wrong_key", "foreign"])
def test_damaged_slot_is_a_counted_miss_and_removed(tmp_path: Path, damage: str) -> None:
    pages = Pages()
    tier = make(pages, tmp_path, pages_budget=3)  # one slab of exactly three slots
    keys = [Pages.key(i) for i in range(3)]
    run(tier, "store", pages.items(keys))
    v = 2 if damage == "truncate" else 1  # cut the last slot; damage the middle one in place
    path, off = slot_file(tier, keys[v])
    blob = pages.blob_bytes()
    with open(path, "r+b") as f:
        if damage == "truncate":
            f.truncate(off + blob // 2)
        else:
            f.seek(off)
            data = bytearray(f.read(blob))
            if damage == "bitflip":
                data[blob - 100] ^= 0x10
            elif damage == "wrong_key":  # a whole, sealed page of another key
                data = bytearray(pack(pages.ctx.fingerprint, keys[0], bytes(data[64:])))
            else:  # same key, right size, another namespace's page
                data = bytearray(pack(b"X" * 16, keys[v], bytes(data[64:])))
            f.seek(off)
            f.write(bytes(data))
    res = run(tier, "load", pages.empty(keys))
    others = tuple(k for i, k in enumerate(keys) if i != v)
    assert res.ok == others and res.failed == (keys[v],)
    assert all(pages.holds(k, i) for i, k in enumerate(keys) if i != v)
    assert tier.contains(keys) == [i != v for i in range(3)]
    s = tier.stats()
    assert (s.corrupt, s.pages) == (1, 2)
    assert keys[v] in tier.take_removed()
    with open(path, "rb") as f:  # tombstoned: a restart does not bring it back
        f.seek(off)
        assert f.read(64) in (bytes(64), b"")
    tier.check_integrity()
    # the slot is reused and the file grows back for a new page
    assert run(tier, "store", pages.items([Pages.key(7)], first_slot=8)).ok == (Pages.key(7),)
    assert run(tier, "load", pages.empty([Pages.key(7)], first_slot=9)).ok == (Pages.key(7),)
    assert pages.holds(Pages.key(7), 9)
    tier.check_integrity()
    tier.close()


def test_slab_truncated_while_down(tmp_path: Path) -> None:
    pages = Pages()
    tier = make(pages, tmp_path, pages_budget=4)
    keys = [Pages.key(i) for i in range(4)]
    run(tier, "store", pages.items(keys))
    tier.close()
    path, off2 = slot_file(tier, keys[2])
    os.truncate(path, off2 + 1000)  # slot 2 keeps its header, loses its tail; slot 3 is gone
    again = make(pages, tmp_path, pages_budget=4)
    assert again.scanned == 3 and os.path.getsize(path) == 4 * slot_bytes(pages)
    res = run(again, "load", pages.empty(keys))
    assert res.ok == tuple(keys[:2]) and res.failed == tuple(keys[2:])
    assert again.stats().corrupt == 1 and again.stats().pages == 2
    again.check_integrity()
    again.close()


def test_reader_serves_a_live_writers_directory(tmp_path: Path) -> None:
    """A reader (another rank of an MLA model) takes no lock, never writes, and sees the
    writer's stores and removals after a rescan; a slot the writer reused is a counted miss."""
    pages = Pages()
    reader = make(pages, tmp_path, reader=True, rescan_s=0.01)  # before any slab exists
    writer = make(pages, tmp_path)
    keys = [Pages.key(i) for i in range(4)]
    assert reader.contains(keys) == [False] * 4
    run(writer, "store", pages.items(keys))
    time.sleep(0.02)
    assert reader.contains(keys) == [True] * 4
    res = run(reader, "load", pages.empty(keys, first_slot=8))
    assert res.ok == tuple(keys) and all(pages.holds(k, 8 + i) for i, k in enumerate(keys))
    before = [header_at(writer, k) for k in keys]
    stored = run(reader, "store", pages.items([Pages.key(9)], first_slot=20))
    assert stored.failed == (Pages.key(9),)  # a reader never writes
    assert [header_at(writer, k) for k in keys] == before
    writer.remove([keys[0]])  # tombstoned by the writer; the reader still indexes it
    res = run(reader, "load", pages.empty(keys[:2], first_slot=8))
    assert res.ok == (keys[1],) and res.failed == (keys[0],)
    assert reader.stats().corrupt == 1 and writer.stats().pages == 3
    time.sleep(0.02)
    assert reader.contains(keys) == [False, True, True, True]
    reader.check_integrity()
    writer.check_integrity()
    reader.close()
    writer.close()


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
    (tmp_path / "f").write_text("a file where a directory should be")
    bad = [
        ({}, "tiers.d.path"),
        ({"path": str(tmp_path), "budget": "lots"}, "tiers.d.budget"),
        ({"path": str(tmp_path), "budget": 10}, "tiers.d.budget"),
        ({"path": str(tmp_path), "policy": "mru"}, "tiers.d.policy"),
        ({"path": str(tmp_path), "fsync": "yes"}, "tiers.d.fsync"),
        ({"path": str(tmp_path), "bugdet": "1GiB"}, "tiers.d.bugdet"),
        ({"path": str(tmp_path), "slab_size": "big"}, "tiers.d.slab_size"),
        ({"path": str(tmp_path), "reader": 1}, "tiers.d.reader"),
        ({"path": str(tmp_path), "rescan_s": -1}, "tiers.d.rescan_s"),
        ({"path": str(tmp_path / "f" / "x")}, "tiers.d.path"),
    ]
    for opts, field in bad:
        with pytest.raises(ConfigError) as info:
            make_tier("disk", "d", opts, pages.ctx)
        assert info.value.field == field
