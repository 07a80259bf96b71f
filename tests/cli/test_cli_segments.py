"""`kvtier segments | limit | shared | top` through the installed console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvtier.memory.segments import SegmentRegistry

KVTIER = shutil.which("kvtier")


def run(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [KVTIER] if KVTIER else [sys.executable, "-m", "kvtier"]
    env = dict(os.environ, KVTIER_RUN_DIR=str(run_dir))
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=60)


def snapshot(run_dir: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((run_dir / "segments").glob("*.json"))}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    reg = SegmentRegistry(tmp_path)
    reg.attach("eng0", device_count=2)
    reg.publish_usage("eng0", {0: 3 << 30, 1: 1 << 29})
    reg.write_stats("eng0", {"host": {"hits": 9, "misses": 1}, "disk": {"hits": 0, "misses": 0}})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    reg.attach("gone", pid=dead.pid, device_count=2)
    return tmp_path


def test_list_text_and_json(run_dir: Path) -> None:
    out = run(run_dir, "segments")
    assert out.returncode == 0, out.stderr
    assert "eng0" in out.stdout and "gone" in out.stdout and "(dead)" in out.stdout
    data = json.loads(run(run_dir, "segments", "--json").stdout)
    by_name = {d["name"]: d for d in data}
    assert by_name["eng0"]["alive"] is True and by_name["gone"]["alive"] is False
    assert by_name["eng0"]["usage"] == {"0": 3 << 30, "1": 1 << 29}


def test_limit_and_shared(run_dir: Path) -> None:
    assert run(run_dir, "limit", "eng0", "1.5GiB").returncode == 0
    assert SegmentRegistry(run_dir).get("eng0").limit == 3 << 29
    assert run(run_dir, "limit", "eng0", "512M").returncode == 0
    assert SegmentRegistry(run_dir).get("eng0").limit == 512 << 20
    out = run(run_dir, "shared", "set", "eng0", "1", "8G")
    assert out.returncode == 0, out.stderr
    assert SegmentRegistry(run_dir).get("eng0").shared == ((1, 8 << 30),)
    show = run(run_dir, "shared", "show", "eng0", "--json")
    assert json.loads(show.stdout) == {"eng0": {"1": 8 << 30}}
    assert "gpu1=8.0GiB" in run(run_dir, "shared", "show").stdout
    assert run(run_dir, "shared", "set", "eng0", "1", "0").returncode == 0
    assert SegmentRegistry(run_dir).get("eng0").shared == ()
    assert run(run_dir, "limit", "eng0", "none").returncode == 0
    assert SegmentRegistry(run_dir).get("eng0").limit is None


@pytest.mark.parametrize("args", [
    ("limit", "nosuch", "1G"),
    ("limit", "eng0", "12X"),
    ("limit", "eng0", "-5"),
    ("shared", "set", "eng0", "7", "1G"),
    ("shared", "set", "eng0", "0", "1G"),
    ("shared", "set", "eng0", "one", "1G"),
    ("shared", "set", "eng0", "1", "lots"),
    ("shared", "set", "nosuch", "1", "1G"),
    ("shared", "show", "nosuch"),
    ("top", "--once", "--interval", "0"),
])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(run_dir: Path,
                                                             args: tuple[str, ...]) -> None:
    before = snapshot(run_dir)
    out = run(run_dir, *args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], out.stderr
    assert snapshot(run_dir) == before


def test_gc_removes_dead_segment(run_dir: Path) -> None:
    out = run(run_dir, "segments", "gc")
    assert out.returncode == 0 and "gone" in out.stdout
    assert sorted(snapshot(run_dir)) == ["eng0.json"]
    assert "removed 0" in run(run_dir, "segments", "gc").stdout


def test_top_once_shows_usage_and_hit_rates(run_dir: Path) -> None:
    out = run(run_dir, "top", "--once")
    assert out.returncode == 0, out.stderr
    assert "gpu0=3.0GiB" in out.stdout and "gpu1=512.0MiB" in out.stdout
    assert "host=90.0%" in out.stdout and "disk=-" in out.stdout


def test_empty_run_dir(tmp_path: Path) -> None:
    assert run(tmp_path, "segments").stdout.strip() == "no segments"
    assert run(tmp_path, "segments", "--json").stdout.strip() == "[]"
    assert "(no segments)" in run(tmp_path, "top", "--once").stdout
