"""Segment registry: attach/detach, limits read by a live pool, gc of dead owners, stats."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvtier.errors import CapacityError, ConfigError
from kvtier.memory.elastic import ElasticPool
from kvtier.memory.elastic_layout import ElasticLayout, PoolLimits
from kvtier.memory.segments import SegmentLimits, SegmentRegistry, default_run_dir, pid_alive
from kvtier.memory.vmm_sim import SimBackend

G = 4096
LAYOUT = ElasticLayout(regions=2, chunk_bytes=512, num_blocks=128, page_bytes=G)
SLOT = LAYOUT.slot_phys_bytes


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_run_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVTIER_RUN_DIR", str(tmp_path / "run"))
    assert default_run_dir() == tmp_path / "run"
    monkeypatch.delenv("KVTIER_RUN_DIR")
    assert str(os.getuid()) in str(default_run_dir()) or "kvtier" in str(default_run_dir())


def test_attach_update_detach_removes_files(tmp_path: Path) -> None:
    reg = SegmentRegistry(tmp_path)
    state = reg.attach("eng-0", local_gpu=0, device_count=2)
    assert state.pids == (os.getpid(),) and reg.path("eng-0").exists()
    reg.set_limit("eng-0", 1 << 30)
    reg.set_shared("eng-0", 1, 1 << 29)
    reg.write_stats("eng-0", {"host": {"hits": 3, "misses": 1}})
    again = reg.attach("eng-0", device_count=2)  # a restart keeps operator settings
    assert again.limit == 1 << 30 and again.shared == ((1, 1 << 29),)
    data = json.loads(reg.path("eng-0").read_text())
    assert data["shared"] == {"1": 1 << 29} and data["version"] == 1
    assert reg.read_stats("eng-0")["host"]["hits"] == 3
    reg.detach("eng-0")
    assert not reg.path("eng-0").exists()
    assert not (reg.stats_dir / "eng-0.json").exists()
    assert list(tmp_path.glob("segments/.tmp-*")) == []


def test_bad_names_gpus_and_unknown_segments(tmp_path: Path) -> None:
    reg = SegmentRegistry(tmp_path)
    with pytest.raises(ConfigError):
        reg.attach("../evil")
    reg.attach("a", device_count=2)
    with pytest.raises(ConfigError):
        reg.set_shared("a", 0, 1)  # the local GPU is not a peer
    with pytest.raises(ConfigError):
        reg.set_shared("a", 2, 1)
    with pytest.raises(ConfigError, match="existing segment"):
        reg.set_limit("b", 1)
    assert reg.get("a").shared == ()


def test_gc_removes_only_dead_segments(tmp_path: Path) -> None:
    reg = SegmentRegistry(tmp_path)
    dead = dead_pid()
    assert not pid_alive(dead) and pid_alive(os.getpid())
    reg.attach("dead", pid=dead)
    reg.attach("live")
    reg.attach("mixed", pid=dead)
    reg.attach("mixed")
    assert reg.gc() == ["dead"]
    assert [s.name for s in reg.segments()] == ["live", "mixed"]


def test_pool_follows_segment_limits_at_run_time(tmp_path: Path) -> None:
    reg = SegmentRegistry(tmp_path)
    reg.attach("eng", device_count=2)
    reg.set_shared("eng", 1, 4 * SLOT)
    reg.set_limit("eng", 3 * SLOT)
    src = SegmentLimits(reg, "eng", publish_interval=0.0)
    be = SimBackend([G + 2 * SLOT, 100 * SLOT], granularity=G)
    pool = ElasticPool(be, LAYOUT, 0, src, reserve_slots=0)
    per_slot = LAYOUT.blocks_per_slot
    blocks = pool.alloc(3 * per_slot)
    assert [pool.device_of(b) for b in blocks[::per_slot]] == [0, 0, 1]
    with pytest.raises(CapacityError):
        pool.alloc(1)
    reg.set_limit("eng", 5 * SLOT)  # raised while running: the pool grows again
    more = pool.alloc(per_slot)
    pool.maintain()
    assert reg.get("eng").usage == ((0, 2 * SLOT), (1, 2 * SLOT))
    reg.set_limit("eng", 2 * SLOT)  # lowered: emptied slots go back at once
    pool.free(more + blocks[2 * per_slot :])
    pool.check_integrity()
    assert pool.usage() == {0: 2 * SLOT} and be.used(1) == 0
    pool.shrink()
    assert reg.get("eng").usage == ((0, 2 * SLOT),)
    assert src.current() == PoolLimits(2 * SLOT, ((1, 4 * SLOT),))


def _hammer(run_dir: str, gpu: int) -> None:
    reg = SegmentRegistry(run_dir)
    for i in range(1, 31):
        reg.set_shared("eng", gpu, i)


def test_concurrent_writers_lose_no_update(tmp_path: Path) -> None:
    import multiprocessing as mp

    reg = SegmentRegistry(tmp_path)
    reg.attach("eng", device_count=4)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), g)) for g in (1, 2, 3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert reg.get("eng").shared == ((1, 30), (2, 30), (3, 30))
    assert list(tmp_path.glob("segments/.tmp-*")) == []
