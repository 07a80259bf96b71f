"""`kvtier bench vmm` on CPU: the simulated rows run, the GPU rows say they were skipped."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_vmm_json_on_cpu() -> None:
    out = subprocess.run([sys.executable, "-m", "kvtier", "bench", "vmm", "--json", "--sim",
                          "--pages", "32"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["rows"]
    names = [r["name"] for r in rows]
    assert "sim: steady alloc per 2 MiB page" in names
    steady = next(r for r in rows if r["name"] == "sim: steady alloc per 2 MiB page")
    assert steady["value"] > 0 and steady["unit"] == "us"
    assert "skipped" in rows[-1]["note"]


def test_bench_vmm_table() -> None:
    out = subprocess.run([sys.executable, "-m", "kvtier", "bench", "vmm", "--pages", "16"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].startswith("measure")
    assert "cold map per page" in out.stdout
