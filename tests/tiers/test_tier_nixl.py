"""NIXL tier against real slab files (POSIX backend) and a loopback S3 server (OBJ backend)."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

try:
    from kvtier.transfer.nixl_transport import load_nixl

    load_nixl()
except Exception as exc:  # the wheel is not installed here
    pytest.skip(f"nixl not importable: {exc}", allow_module_level=True)

from servers import free_port, wait_port
from tierkit import Pages, run, slot_bytes, slot_file

from kvtier.errors import ConfigError
from kvtier.keys import HEADER_SIZE
from kvtier.tiers.nixl import NixlTier
from kvtier.tiers.nixl_io import FileSlots
from kvtier.tiers.registry import make_tier


def make(pages: Pages, path: Path, slots: int = 64, **kw: Any) -> NixlTier:
    opts = {"path": str(path), "budget": slots * slot_bytes(pages), **kw}
    tier = make_tier("nixl", "nx", opts, pages.ctx)
    assert isinstance(tier, NixlTier)
    return tier


@pytest.mark.parametrize("io", ["aio", "sync"])
def test_round_trip_bit_exact(tmp_path: Path, io: str) -> None:
    pages = Pages()
    tier = make(pages, tmp_path, io=io, slab_size=5 * slot_bytes(pages))  # several slabs
    keys = [Pages.key(i) for i in range(8)]
    stored = run(tier, "store", pages.items(keys))
    assert stored.ok == tuple(keys) and not stored.failed
    assert tier.contains([*keys, Pages.key(99)]) == [True] * 8 + [False]
    loaded = run(tier, "load", pages.empty([*keys, Pages.key(99)], first_slot=16))
    assert loaded.ok == tuple(keys) and loaded.failed == (Pages.key(99),)
    assert all(pages.holds(k, 16 + i) for i, k in enumerate(keys))
    s = tier.stats()
    assert (s.pages, s.used_bytes, s.loads_ok, s.loads_failed) == (8, 8 * pages.blob_bytes(), 8, 1)
    assert tier.store.host.temporary == 0  # the pool buffer was found and registered once
    tier.check_integrity()
    tier.close()


def test_buffers_of_unknown_owner_are_registered_per_batch(tmp_path: Path) -> None:
    pages = Pages()
    tier = make(pages, tmp_path)
    key = Pages.key(1)
    _, blob = pages.seal(key, 0)
    raw = ctypes.create_string_buffer(bytes(blob), len(blob))  # no owner chain to follow
    assert run(tier, "store", [(key, memoryview(raw).cast("B"))]).ok == (key,)
    ctypes.memset(raw, 0xEE, len(blob))
    assert run(tier, "load", [(key, memoryview(raw).cast("B"))]).ok == (key,)
    assert raw.raw == bytes(blob)
    assert tier.store.host.temporary == 2
    tier.check_integrity()
    tier.close()


def test_restart_serves_every_page(tmp_path: Path) -> None:
    pages = Pages()
    keys = [Pages.key(i) for i in range(12)]
    tier = make(pages, tmp_path, slab_size=4 * slot_bytes(pages))
    run(tier, "store", pages.items(keys))
    run(tier, "load", pages.empty(keys[:1]))  # a page read leaves nothing behind
    with pytest.raises(ConfigError, match=r"tiers\.nx\.path"):
        make(pages, tmp_path)  # the directory is locked while the tier lives
    tier.close()
    # a changed slab_size must not move pages: the manifest keeps the layout
    again = make(pages, tmp_path, slab_size="1GiB")
    assert again.scanned == 12 and again.stats().pages == 12
    res = run(again, "load", pages.empty(keys))
    assert res.ok == tuple(keys)
    assert all(pages.holds(k, i) for i, k in enumerate(keys))
    again.check_integrity()
    again.close()
    other = make(Pages(), tmp_path)  # another namespace sees none of them
    assert other.scanned == 0
    other.close()


def test_removed_pages_stay_removed_after_restart(tmp_path: Path) -> None:
    pages = Pages()
    keys = [Pages.key(i) for i in range(6)]
    tier = make(pages, tmp_path)
    run(tier, "store", pages.items(keys))
    tier.remove(keys[:2])
    assert tier.contains(keys) == [False] * 2 + [True] * 4
    tier.check_integrity()
    tier.close()
    again = make(pages, tmp_path)
    assert again.scanned == 4 and again.contains(keys) == [False] * 2 + [True] * 4
    again.check_integrity()
    again.close()


def test_bit_flip_is_a_counted_miss_and_removed(tmp_path: Path) -> None:
    pages = Pages()
    keys = [Pages.key(i) for i in range(4)]
    tier = make(pages, tmp_path)
    run(tier, "store", pages.items(keys))
    path, off = slot_file(tier, keys[1])
    with open(path, "r+b") as f:
        f.seek(off + HEADER_SIZE + 100)
        byte = f.read(1)
        f.seek(off + HEADER_SIZE + 100)
        f.write(bytes([byte[0] ^ 0x01]))
    res = run(tier, "load", pages.empty(keys))
    assert res.failed == (keys[1],) and set(res.ok) == {keys[0], keys[2], keys[3]}
    assert tier.stats().corrupt == 1 and tier.take_removed() == [keys[1]]
    assert tier.contains(keys) == [True, False, True, True]
    tier.check_integrity()
    tier.close()
    again = make(pages, tmp_path)  # the damaged page was tombstoned, not just forgotten
    assert again.scanned == 3 and not again.contains([keys[1]])[0]
    again.close()


def test_truncated_slab_is_a_counted_miss(tmp_path: Path) -> None:
    pages = Pages()
    keys = [Pages.key(i) for i in range(4)]
    tier = make(pages, tmp_path, slots=4, slab_size=4 * slot_bytes(pages))
    run(tier, "store", pages.items(keys))
    path, off = slot_file(tier, keys[3])
    assert off == 3 * slot_bytes(pages)
    os.truncate(path, off + 1000)  # the last page loses its tail
    res = run(tier, "load", pages.empty(keys))
    assert res.failed == (keys[3],) and len(res.ok) == 3  # its neighbours still load
    assert all(pages.holds(k, i) for i, k in enumerate(keys[:3]))
    assert tier.stats().corrupt == 1 and tier.contains(keys) == [True, True, True, False]
    assert tier.stats().loads_failed == 1
    tier.close()


def test_budget_eviction_follows_the_policy(tmp_path: Path) -> None:
    pages = Pages()
    tier = make(pages, tmp_path, slots=8, policy="lru")
    first = [Pages.key(i) for i in range(8)]
    assert len(run(tier, "store", pages.items(first)).ok) == 8
    run(tier, "load", pages.empty(first[:4], first_slot=16))  # 0-3 are now the recent ones
    more = [Pages.key(i) for i in range(8, 12)]
    assert run(tier, "store", pages.items(more)).ok == tuple(more)
    assert sorted(tier.take_removed()) == sorted(first[4:])
    assert tier.contains(first + more) == [True] * 4 + [False] * 4 + [True] * 4
    s = tier.stats()
    assert s.pages == 8 and s.capacity_bytes is not None and s.used_bytes <= s.capacity_bytes
    res = run(tier, "load", pages.empty(first[:4] + more))
    assert len(res.ok) == 8 and all(pages.holds(k, i) for i, k in enumerate(first[:4] + more))
    tier.check_integrity()
    tier.close()
    assert isinstance(tier.store, FileSlots)
    assert len(list(Path(tier.store.root).glob("slab-*.kvt"))) == 1


@pytest.mark.parametrize(
    ("opts", "field"),
    [
        ({}, "tiers.nx.path"),
        ({"path": "P", "backend": "s3"}, "tiers.nx.backend"),
        ({"path": "P", "io": "fast"}, "tiers.nx.io"),
        ({"path": "P", "budget": 10}, "tiers.nx.budget"),
        ({"path": "P", "policy": "fifo"}, "tiers.nx.policy"),
        ({"path": "P", "timeout": 0}, "tiers.nx.timeout"),
        ({"path": "P", "bucket": "b"}, "tiers.nx.bucket"),  # an obj option for posix
        ({"path": "P", "slab_size": "1KiB"}, "tiers.nx.slab_size"),
        ({"backend": "obj"}, "tiers.nx.bucket"),
        ({"backend": "obj", "bucket": "b", "endpoint": "127.0.0.1:9"}, "tiers.nx.endpoint"),
    ],
)
def test_bad_options_name_the_field(tmp_path: Path, opts: dict[str, Any], field: str) -> None:
    pages = Pages()
    if opts.get("path") == "P":
        opts = {**opts, "path": str(tmp_path)}
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        make_tier("nixl", "nx", opts, pages.ctx)


def test_unwritable_path_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"tiers\.nx\.path"):
        make_tier("nixl", "nx", {"path": str(blocker / "sub")}, Pages().ctx)


# -- objects: an S3 server on loopback ---------------------------------------------------------
@pytest.fixture
def s3_endpoint(tmp_path: Path) -> Iterator[str]:
    exe = shutil.which("moto_server")
    if exe is None:
        pytest.skip("moto_server not installed")
    port = free_port()
    with open(tmp_path / "moto.log", "wb") as log:
        proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        wait_port(port, 30.0, proc)
        url = f"http://127.0.0.1:{port}"
        urllib.request.urlopen(urllib.request.Request(f"{url}/kvt", method="PUT"), timeout=10)
        yield url
    finally:
        proc.kill()
        proc.wait(10)


def obj_tier(pages: Pages, url: str, slots: int = 16) -> NixlTier:
    opts = {"backend": "obj", "bucket": "kvt", "endpoint": url, "access_key": "testing",
            "secret_key": "testing", "budget": slots * pages.blob_bytes()}
    tier = make_tier("nixl", "nx", opts, pages.ctx)
    assert isinstance(tier, NixlTier)
    return tier


def test_objects_round_trip_restart_and_damage(s3_endpoint: str) -> None:
    pages = Pages(payload_bytes=8 << 10)
    keys = [Pages.key(i) for i in range(6)]
    tier = obj_tier(pages, s3_endpoint)
    assert run(tier, "store", pages.items(keys)).ok == tuple(keys)
    res = run(tier, "load", pages.empty(keys, first_slot=8))
    assert res.ok == tuple(keys) and all(pages.holds(k, 8 + i) for i, k in enumerate(keys))
    tier.check_integrity()
    slot = tier._slot[keys[2]]
    tier.close()
    # damage one object behind the tier's back
    boto3 = pytest.importorskip("boto3")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    name = f"kvtier/{pages.ctx.fingerprint.hex()}/slot-{slot:08d}"
    s3.put_object(Bucket="kvt", Key=name, Body=b"KVTB" + b"\0" * 60)
    again = obj_tier(pages, s3_endpoint)
    assert again.scanned == 5 and again.contains(keys) == [True, True, False, True, True, True]
    res = run(again, "load", pages.empty(keys))
    assert len(res.ok) == 5 and all(pages.holds(k, i) for i, k in enumerate(keys) if i != 2)
    # an object deleted behind the tier's back: a counted miss, forgotten; neighbours load
    s3.delete_object(Bucket="kvt", Key=f"kvtier/{pages.ctx.fingerprint.hex()}/"
                     f"slot-{again._slot[keys[4]]:08d}")
    res = run(again, "load", pages.empty(keys))
    assert res.failed == (keys[2], keys[4]) and len(res.ok) == 4
    assert again.stats().corrupt == 1 and again.take_removed() == [keys[4]]
    again.check_integrity()
    again.close()


def test_objects_budget_and_unreachable_endpoint(s3_endpoint: str) -> None:
    pages = Pages(payload_bytes=8 << 10)
    tier = obj_tier(pages, s3_endpoint, slots=4)
    keys = [Pages.key(i) for i in range(6)]
    assert len(run(tier, "store", pages.items(keys[:4])).ok) == 4
    assert run(tier, "store", pages.items(keys[4:])).ok == tuple(keys[4:])
    assert len(tier.take_removed()) == 2 and tier.stats().pages == 4
    tier.check_integrity()
    tier.close()
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError, match=r"tiers\.nx\.endpoint"):
        obj_tier(pages, dead, slots=2)


def test_concurrent_jobs_keep_the_index_whole(tmp_path: Path) -> None:
    pages = Pages(num_slots=64)
    tier = make(pages, tmp_path, slots=24, threads=2, max_inflight=16)
    keys = [Pages.key(i) for i in range(32)]
    items = pages.items(keys)
    jobs = [tier.submit_store(items[i : i + 4]) for i in range(0, 32, 4)]
    assert all(j is not None for j in jobs)
    results = tier.wait_all(60)
    assert sum(len(r.ok) for r in results) == 32  # 8 evicted on the way, none refused
    held = [k for k, here in zip(keys, tier.contains(keys)) if here]
    assert len(held) == 24
    loads = [tier.submit_load(pages.empty(held[i : i + 6], first_slot=32 + i))
             for i in range(0, 24, 6)]
    assert all(j is not None for j in loads)
    done = tier.wait_all(60)
    assert sum(len(r.ok) for r in done) == 24
    assert all(pages.holds(k, 32 + i) for i, k in enumerate(held))
    tier.check_integrity()
    tier.close()
