"""`kvtier bench vmm` on CPU: the KV bit-for-bit check and its diagnostics, and the recorder
that keeps every row measured before a failure."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from kvtier.cli.bench_vmm import Recorder, Row, row  # noqa: E402
from kvtier.cli.bench_vmm_attn import kv_mismatch, max_abs_diff, mismatch_report  # noqa: E402
from kvtier.memory.elastic import ElasticPool  # noqa: E402
from kvtier.memory.elastic_layout import ElasticLayout  # noqa: E402
from kvtier.memory.vmm_sim import SimBackend  # noqa: E402


def _kv() -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(1)
    static = torch.randn(3, 2, 40, 4, 2, 8, generator=g).to(torch.bfloat16)  # [L][kv][blocks]...
    return static.clone(), static


def test_kv_mismatch_is_bit_for_bit_and_names_layer_kv_block() -> None:
    elastic, static = _kv()
    assert kv_mismatch(elastic, static) == (0, [])
    elastic[2, 1, 17, 3, 1, 5] = -elastic[2, 1, 17, 3, 1, 5]  # one value in layer 2, V
    elastic[0, 0, 39] = 0  # a block that reads zeros (a page that never got the copy)
    n, hits = kv_mismatch(elastic, static)
    assert (n, hits) == (2, [(0, 0, 39), (2, 1, 17)])
    # -0.0 == 0.0 numerically, but the bytes differ: a bitwise check must see it
    elastic, static = _kv()
    static[1, 0, 3, 0, 0, 0] = 0.0
    elastic[1, 0, 3, 0, 0, 0] = -0.0
    assert torch.equal(elastic, static)
    assert kv_mismatch(elastic, static) == (1, [(1, 0, 3)])
    assert kv_mismatch(elastic, static, limit=0) == (1, [])


def test_mismatch_report_says_what_and_where() -> None:
    elastic, static = _kv()
    elastic[0, 0, 39] = 0
    elastic[2, 1, 17, 0, 0, 0] += 1
    _, hits = kv_mismatch(elastic, static)
    text = mismatch_report(None, elastic, static, hits)
    assert "layer 0 K block 39" in text and "all zero=True" in text
    assert "layer 2 V block 17" in text and "all zero=False" in text
    lay = ElasticLayout(regions=6, chunk_bytes=256, num_blocks=40, page_bytes=4096)
    be = SimBackend([64 * 4096], granularity=4096)
    pool = ElasticPool(be, lay, 0, reserve_slots=0)
    try:
        pool.alloc(16)  # slot 0 backed; block 39 (slot 2) is not
        text = mismatch_report(pool, elastic, static, hits)
        assert "block 39: " in text and "slot 2 dev -1" in text and "mapped=zero page" in text
        assert "block 17: " in text and "slot 1 dev -1" in text
    finally:
        pool.close()
    assert max_abs_diff(elastic[2], static[2]) > 0.5


def test_recorder_keeps_rows_written_before_a_failure(tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    rec = Recorder(str(path))
    assert json.loads(path.read_text())["rows"] == []

    def rows() -> Iterator[Row]:
        yield row("first", 1.0, "us", "-", None)
        on_disk = json.loads(path.read_text())["rows"]
        assert [r["name"] for r in on_disk] == ["first"]  # written before the next measure
        yield row("second", 2.0, "us", "-", None)
        raise RuntimeError("attention over elastic KV differs: layer 1 V block 7")

    assert rec.section("attention", rows) is False
    assert rec.section("after", lambda: iter([row("third", 3.0, "us", "-", True)])) is True
    data = json.loads(path.read_text())
    assert [r["name"] for r in data["rows"]] == ["first", "second", "attention: FAILED",
                                                 "third"]
    assert data["failed"] == ["attention"]
    assert "layer 1 V block 7" in data["rows"][2]["note"] and data["rows"][2]["ok"] is False


def test_bench_vmm_out_file(tmp_path: Path) -> None:
    path = tmp_path / "vmm.json"
    out = subprocess.run([sys.executable, "-m", "kvtier", "bench", "vmm", "--sim", "--pages",
                          "8", "--out", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(path.read_text())
    assert data["failed"] == [] and data["bench"] == "vmm"
    assert "sim: cold map per page (no zero fill)" in [r["name"] for r in data["rows"]]
