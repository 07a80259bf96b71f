"""`kvtier bench tiers --json`: stdout is one JSON document (NIXL's own logging goes to stderr),
with a disk row set against sequential I/O and a NIXL row against raw slab I/O."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_tiers_json_disk_and_nixl(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = subprocess.run(
        [sys.executable, "-m", "kvtier.cli.main", "bench", "tiers", "--tiers", "disk,nixl",
         "--pages", "8", "--batch", "4", "--page-mib", "0.25", "--repeat", "1",
         "--dir", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=300, check=True)
    doc = json.loads(out.stdout)
    rows = {(r["tier"], r["op"]): r for r in doc["results"]}
    assert set(rows) == {(t, op) for t in ("disk", "nixl") for op in ("store", "load")}
    assert all(r["tier_gbs"] > 0 and r["raw_gbs"] > 0 for r in rows.values())
    assert rows["disk", "load"]["seq_gbs"] > 0
