"""`kvtier bench ttft` on its tiny CPU preset: every case runs and the answers match recompute."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from kvtier.cli import bench_ttft


def test_bench_ttft_tiny_runs_every_case(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    bench_ttft.add_arguments(parser)
    out = tmp_path / "ttft.json"
    args = parser.parse_args(
        ["--preset", "tiny", "--repeats", "1", "--disk-path", str(tmp_path / "disk"),
         "--out", str(out)]
    )  # fmt: skip
    assert bench_ttft.run(args) == 0
    r = json.loads(out.read_text())
    assert r["errors"] == []
    for case in ("host", "disk", "slow_disk"):
        assert r[f"{case}_cosine_vs_recompute"] > 0.9999
        assert r[f"{case}_s"] > 0
    assert r["host_loaded_tokens"] == r["disk_loaded_tokens"] == r["cached"]
    assert r["stored_pages"] == r["cached"] // 16
    assert r["slow_disk_loaded_tokens"] == 0  # the cost model recomputed
    assert r["slow_disk_load_estimate_s"] > r["recompute_s"]
    assert r["floor_s"] >= r["suffix_alone_s"]


def test_bench_ttft_keeps_partial_results_when_a_case_fails(tmp_path: Path) -> None:
    """The disk path is a file: every kvtier case fails, the baselines are still in the JSON."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    parser = argparse.ArgumentParser()
    bench_ttft.add_arguments(parser)
    out = tmp_path / "ttft.json"
    args = parser.parse_args(
        ["--preset", "tiny", "--repeats", "1", "--disk-path", str(blocker), "--out", str(out)]
    )
    assert bench_ttft.run(args) == 1
    r = json.loads(out.read_text())
    assert r["recompute_s"] > 0 and r["floor_s"] > 0
    assert "host_s" not in r
    assert [e.split(":")[0] for e in r["errors"]] == ["host", "disk", "slow disk"]
