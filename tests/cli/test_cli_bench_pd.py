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


def test_measure_cpu_tiny() -> None:
    doc = measure("cpu", "tiny", 256, 1)
    assert [r["case"] for r in doc["results"]] == ["contiguous", "scattered"]
    contiguous, scattered = doc["results"]
    assert contiguous["bytes"] == scattered["bytes"] == 2 * 16 * 2 * 2 * 32 * 4 * 16
    assert contiguous["descriptors"] == 2 and scattered["descriptors"] == 2 * 16
    assert all(r["gbps"] > 0 and r["ceiling_gbps"] > 0 for r in doc["results"])
    doc["machine"] = {"date": "today"}
    assert "| contiguous | 0 | 2 |" in markdown(doc)
