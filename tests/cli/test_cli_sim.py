"""`kvtier sim` through the installed console script, on traces small enough to solve by hand."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def kvtier(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("kvtier")
    cmd = [exe] if exe else [sys.executable, "-m", "kvtier"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=60)


def sim_json(tmp_path: Path, policy: str, capacity: int, keys: str) -> dict[str, object]:
    trace = tmp_path / "trace.txt"
    trace.write_text("\n".join(keys.split()) + "\n")
    out = kvtier(
        "sim", "--policy", policy, "--capacity", str(capacity), "--trace", str(trace), "--json"
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout
    result: dict[str, object] = json.loads(lines[0])
    return result


@pytest.mark.parametrize(
    ("policy", "capacity", "keys", "hits"),
    [
        # a b miss; a hit; c evicts b; b evicts a
        ("lru", 2, "a b a c b", 1),
        # a b miss; a b hit; c evicts a; a evicts b
        ("lru", 2, "a b a b c a", 2),
        ("lru", 3, "x y z x y z x y z", 6),
        # b goes to B1 for c, c to B1 for b; b returns from B1 into T2 (p = 1); a stays in T2,
        # so the second a hits; T2's b makes room for c
        ("arc", 2, "a b a c b a c", 2),
        ("lru", 2, "a b a c b a c", 1),
        # S holds 1, M 1: a (hit once) leaves S for the ghost; b's hit at the end counts
        ("s3fifo", 2, "a b a c b", 2),
        # capacity 4 (S 1, M 3): a leaves through the ghost, comes back into M, then hits
        ("s3fifo", 4, "a b c d e a a", 1),
    ],
)
def test_hits_match_hand_computed(
    tmp_path: Path, policy: str, capacity: int, keys: str, hits: int
) -> None:
    n = len(keys.split())
    res = sim_json(tmp_path, policy, capacity, keys)
    assert res == {
        "policy": policy,
        "capacity": capacity,
        "accesses": n,
        "hits": hits,
        "misses": n - hits,
        "hit_ratio": hits / n,
    }


def test_empty_lines_are_skipped_and_keys_are_any_string(tmp_path: Path) -> None:
    trace = tmp_path / "t.txt"
    trace.write_text('key one\n\nkey one\r\n{"k": 1}\n\n')
    out = kvtier("sim", "--policy", "arc", "--capacity", "4", "--trace", str(trace), "--json")
    res = json.loads(out.stdout)
    assert (res["accesses"], res["hits"], res["misses"]) == (3, 1, 2)


def test_empty_trace_has_zero_hit_ratio(tmp_path: Path) -> None:
    trace = tmp_path / "empty.txt"
    trace.write_text("")
    out = kvtier("sim", "--policy", "s3fifo", "--capacity", "4", "--trace", str(trace), "--json")
    assert json.loads(out.stdout)["hit_ratio"] == 0.0


def test_readable_line_without_json(tmp_path: Path) -> None:
    trace = tmp_path / "t.txt"
    trace.write_text("a\nb\na\n")
    out = kvtier("sim", "--policy", "lru", "--capacity", "2", "--trace", str(trace))
    assert out.returncode == 0
    assert "1 hits" in out.stdout and "hit ratio 0.3333" in out.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--capacity", "0", "--trace", "EXISTING"], "--capacity"),
        (["--capacity", "-3", "--trace", "EXISTING"], "--capacity"),
        (["--capacity", "4", "--trace", "MISSING"], "--trace"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], needle: str) -> None:
    existing = tmp_path / "t.txt"
    existing.write_text("a\n")
    args = [
        str(existing) if a == "EXISTING" else str(tmp_path / "nope.txt") if a == "MISSING" else a
        for a in args
    ]
    out = kvtier("sim", "--policy", "lru", *args, "--json")
    assert out.returncode == 2
    assert out.stdout == ""
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and needle in err[0], out.stderr
