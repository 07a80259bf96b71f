"""The cache with the host tier alone, and with a local disk below it."""

import json
from pathlib import Path

import pytest

from kvtier.cache import EventKind, LookupStatus, TieredCache
from kvtier.errors import ConfigError

from .helpers import GEOM, NS, check_loaded, content, keys, settle, store, store_all

SLOT = 20480  # one 16 KiB page + header, 4 KiB aligned


def host_only(slots: int, policy: str = "lru") -> TieredCache:
    return TieredCache({"host": {"budget": slots * SLOT, "policy": policy}}, NS)


@pytest.mark.parametrize("policy", ["lru", "arc", "s3fifo"])
def test_store_lookup_load_round_trip(policy: str) -> None:
    cache = host_only(8, policy)
    ks = keys(5)
    assert cache.lookup(ks).status == LookupStatus.MISS
    store(cache, ks[:3])
    res = cache.lookup(ks)
    assert (res.status, res.hits, res.pending) == (LookupStatus.HIT, 3, 0)
    check_loaded(cache, ks[:3])
    events = cache.take_events()
    assert [(e.kind, e.tier, len(e.keys)) for e in events] == [(EventKind.STORED, "host", 3)]
    cache.check_integrity()
    assert cache.pins() == 0
    cache.close()


def test_pages_being_written_are_invisible_and_ask_for_retry() -> None:
    cache = host_only(4)
    ks = keys(2)
    plan = cache.prepare_store(ks)
    assert plan is not None and plan.keys == tuple(ks)
    assert cache.lookup(ks).status == LookupStatus.RETRY
    with pytest.raises(KeyError):
        cache.prepare_load(ks[:1])
    # a second store of the same keys plans nothing (they are already being written)
    assert cache.prepare_store(ks) == type(plan)((), (), ())
    cache.complete_store(ks, success=False)
    assert cache.lookup(ks).status == LookupStatus.MISS
    assert cache.host_pool.num_free == 4
    assert cache.stats().store_failures == 2
    cache.check_integrity()
    assert cache.pins() == 0


def test_pinned_pages_are_never_evicted_and_full_cache_rejects() -> None:
    cache = host_only(3)
    a = keys(3)
    store(cache, a)
    plan = cache.prepare_load(a)  # every page leased
    assert cache.prepare_store(keys(1, start=1000)) is None
    assert cache.stats().store_rejected == 1
    cache.complete_load(plan.keys)
    b = keys(1, start=1000)
    plan2 = cache.prepare_store(b)
    assert plan2 is not None and len(plan2.evicted) == 1 and plan2.evicted[0] == a[0]  # LRU
    cache.complete_store(plan2.keys)
    assert cache.lookup(a).hits == 0  # the first page went; the prefix is broken
    cache.check_integrity()


def test_partial_plan_when_room_is_short() -> None:
    cache = host_only(4)
    held = keys(2, start=5000)
    store(cache, held)
    cache.prepare_load(held)
    plan = cache.prepare_store(keys(4))
    assert plan is not None and len(plan.keys) == 2 and plan.keys == tuple(keys(4)[:2])
    cache.complete_store(plan.keys)
    cache.complete_load(held)
    cache.check_integrity()
    assert cache.pins() == 0


def test_prepare_load_of_missing_key_leases_nothing() -> None:
    cache = host_only(4)
    ks = keys(3)
    store(cache, ks[:2])
    with pytest.raises(KeyError):
        cache.prepare_load(ks)
    assert cache.pins() == 0
    cache.check_integrity()


def disk_cache(tmp_path: Path, host_slots: int, mode: str = "write_through") -> TieredCache:
    cfg = {
        "host": {"budget": host_slots * SLOT},
        "tiers": [{"kind": "disk", "path": str(tmp_path / "disk"), "budget": "4MiB", "mode": mode}],
    }
    return TieredCache(cfg, NS)


@pytest.mark.parametrize("mode", ["write_through", "demote"])
def test_lower_tier_hit_is_promoted_then_loaded(tmp_path: Path, mode: str) -> None:
    cache = disk_cache(tmp_path, 4, mode)
    ks = keys(6)
    store_all(cache, ks[:4])
    store_all(cache, ks[4:])  # evicts the oldest pages from host memory
    first = cache.lookup(ks)
    assert first.status == LookupStatus.PENDING and first.hits == 0 and first.pending >= 1
    res = settle(cache, ks)
    # The host tier holds 4 pages (demote mode keeps one slot free for demotions): the rest is
    # a miss, not a livelock that evicts the prefix it just promoted.
    assert res.hits == (4 if mode == "write_through" else 3)
    check_loaded(cache, ks[: res.hits])
    kinds = {(e.kind, e.tier) for e in cache.take_events()}
    assert (EventKind.PROMOTED, "disk") in kinds
    assert (EventKind.DEMOTED if mode == "demote" else EventKind.STORED, "disk") in kinds
    stats = cache.stats()
    assert 1 <= stats.tier("disk").hits <= stats.promotions
    cache.drain()
    cache.check_integrity()
    assert cache.pins() == 0
    cache.close()


def test_new_cache_on_same_disk_serves_earlier_pages(tmp_path: Path) -> None:
    ks = keys(3)
    with disk_cache(tmp_path, 4) as first:
        store(first, ks)
        first.drain()
    with disk_cache(tmp_path, 4) as second:
        assert settle(second, ks).hits == 3
        check_loaded(second, ks)
        second.check_integrity()


def test_corrupt_lower_tier_page_is_a_counted_miss(tmp_path: Path) -> None:
    ks = keys(2)
    with disk_cache(tmp_path, 4) as first:
        store(first, ks)
        first.drain()
    for f in (tmp_path / "disk").rglob("slab-*.kvt"):  # flip a payload byte of every page
        data = bytearray(f.read_bytes())
        stride = json.loads((f.parent / "manifest.json").read_text())["slot_bytes"]
        for off in range(0, len(data), stride):
            if data[off : off + 4] == b"KVTB":
                data[off + 100] ^= 0xFF
        f.write_bytes(bytes(data))
    with disk_cache(tmp_path, 4) as second:
        res = settle(second, ks)
        assert res.hits == 0 and res.status == LookupStatus.MISS
        assert second.stats().promotion_failures == 2
        assert second.stats().tier("disk").corrupt == 2
        second.check_integrity()
        assert second.pins() == 0


def test_foreign_namespace_never_served(tmp_path: Path) -> None:
    from kvtier.keys import Namespace

    ks = keys(2)
    with disk_cache(tmp_path, 4) as first:
        store(first, ks)
        first.drain()
    other = Namespace("other-model", GEOM)
    disk = {"kind": "disk", "path": str(tmp_path / "disk")}
    cfg = {"host": {"budget": 4 * SLOT}, "tiers": [disk]}
    with TieredCache(cfg, other) as cache:
        # the same key bytes from another namespace: blobs carry the fingerprint and are refused
        res = settle(cache, ks)
        assert res.hits == 0
        cache.check_integrity()
    assert content(ks[0]).numel() == GEOM.page_bytes


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        ({"host": {"policy": "mru"}}, "host.policy"),
        ({"host": {"budget": "lots"}}, "host.budget"),
        ({"tiers": [{"kind": "tape"}]}, "tiers.tape.kind"),
        ({"tiers": [{"kind": "disk", "mode": "sideways"}]}, "tiers.disk.mode"),
        ({"hots": {}}, "hots"),
        ({"promotion": {"max_pages": 0}}, "promotion.max_pages"),
    ],
)
def test_bad_config_names_the_field(cfg: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        TieredCache(cfg, NS)


def test_stats_are_published_for_kvtier_top(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import subprocess

    monkeypatch.setenv("KVTIER_RUN_DIR", str(tmp_path))
    cache = TieredCache({"host": {"budget": 4 * SLOT}, "segment": "engine-a"}, NS)
    ks = keys(2)
    store(cache, ks)
    check_loaded(cache, ks)
    cache.close()
    data = json.loads((tmp_path / "stats" / "engine-a.json").read_text())
    assert data["tiers"]["host"]["hits"] == 2
    with pytest.raises(ConfigError, match="segment"):
        TieredCache({"segment": ""}, NS)
    out = subprocess.run(["kvtier", "top", "--once"], capture_output=True, text=True,
                         env={**__import__("os").environ, "KVTIER_RUN_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
