"""`kvtier bench pd` on CPU: two processes, verified bytes, a report with the ceiling."""

from __future__ import annotations

import pytest

from kvtier.cli.bench_pd import bench_spec, markdown, measure
from kvtier.errors import ConfigError

try:
    from kvtier.transfer.nixl_transport import load_nixl

    load_nixl()
except ConfigError:  # pragma: no cover - nixl is a test dependency
    pytest.skip("nixl is not installed", allow_module_level=True)


def test_bench_spec_plain_and_mla() -> None:
    spec, blocks = bench_spec("llama3-8b", 1000)
    assert blocks == 63 and spec.num_blocks == 126 and len(spec.tensors) == 32
    mla, _ = bench_spec("deepseek-v3-mla", 64)
    assert mla.groups[0].kind == "mla_attention" and mla.block_bytes(0) == 16 * 576 * 2


def test_measure_cpu_tiny(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rows_file = tmp_path / "rows.jsonl"
    doc = measure("cpu", "tiny", 256, 1, parts=(2,), slot_mib=1, rows_file=rows_file)
    got = [(r["case"], r["mode"], r["parts"]) for r in doc["results"]]
    assert got == [(c, m, p) for c in ("contiguous", "runs", "scattered")
                   for m, p in (("request", 1), ("transfer", 2), ("packed", 1), ("packed-ramp", 1))]
    assert len(rows_file.read_text().splitlines()) == len(got)
    by = {(r["case"], r["mode"]): r for r in doc["results"]}
    assert all(r["bytes"] == 2 * 16 * 2 * 2 * 32 * 4 * 16 for r in doc["results"])
    assert by["contiguous", "request"]["descriptors"] == 2
    # pairs adjacent on both sides merge even when the request lists them apart
    assert 2 * 8 < by["scattered", "request"]["descriptors"] <= 2 * 16
    assert 2 < by["runs", "request"]["descriptors"] < 2 * 16
    assert by["scattered", "packed"]["descriptors"] == 1  # one 1-MiB slot holds the request
    assert by["scattered", "packed-ramp"]["descriptors"] == 1
    assert all(r["gbps"] > 0 and r["ceiling_gbps"] > 0 for r in doc["results"])
    doc["machine"] = {"date": "today"}
    assert "| contiguous | request | 1 | 0 | 2 |" in markdown(doc)
