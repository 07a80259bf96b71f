"""`kvtier bench policy` end to end, on short traces."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from kvtier.cli.tracegen import TRACES


def test_json_has_ops_and_every_trace_capacity_policy_cell() -> None:
    exe = shutil.which("kvtier")
    cmd = [exe] if exe else [sys.executable, "-m", "kvtier"]
    out = subprocess.run(
        [*cmd, "bench", "policy", "--json", "--accesses", "3000"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    res = json.loads(out.stdout)
    assert res["accesses"] == 3000 and res["machine"]["cpu"]
    assert [r["policy"] for r in res["ops"]] == ["lru", "arc", "s3fifo"]
    for r in res["ops"]:
        assert r["ops"] >= 3000 and r["ops_per_s"] > 0
    cells = {(r["trace"], r["capacity"], r["policy"]) for r in res["hit_ratios"]}
    expected = {
        (t.name, c, p)
        for t in TRACES.values()
        for c in t.capacities
        for p in ("lru", "arc", "s3fifo")
    }
    assert cells == expected
    for r in res["hit_ratios"]:
        assert r["hits"] + r["misses"] == r["accesses"] == 3000
        assert 0.0 <= r["hit_ratio"] <= 1.0


def test_table_and_bad_policy() -> None:
    exe = shutil.which("kvtier")
    cmd = [exe] if exe else [sys.executable, "-m", "kvtier"]
    out = subprocess.run(
        [*cmd, "bench", "policy", "--accesses", "500", "--policies", "lru"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "ops/s" in out.stdout and "zipf" in out.stdout
    bad = subprocess.run(
        [*cmd, "bench", "policy", "--policies", "lfu"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "policy" in bad.stderr and "s3fifo" in bad.stderr
