"""The main job: a multi-turn chat served by vLLM with and without kvtier, side by side.

Each run is one `python -m kvtier.integrations.vllm.workload` subprocess (vLLM wants its own
process tree); this module builds the specs, follows the runs' progress lines and compares them.
Nothing here imports vLLM.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtier.errors import KVTierError


@dataclass(frozen=True)
class DemoSettings:
    sessions: int = 4
    turns: int = 4
    system_tokens: int = 512
    user_tokens: int = 96
    max_tokens: int = 16
    gpu_blocks: int = 0  # vLLM KV blocks of 32 tokens; 0: one conversation's worth
    host_budget: str = "4MiB"  # about 30 pages of the demo model: the rest lives on disk
    disk_budget: str = "256MiB"
    model: str = "demo"  # tiny_model kind
    seed: int = 0

    def max_prompt(self) -> int:
        return self.system_tokens + self.turns * (self.user_tokens + self.max_tokens)


class RunError(KVTierError):
    """A workload subprocess failed; the message carries the tail of its log."""


def run_workload(
    spec: dict[str, Any], log_path: Path, on_event: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Run one workload subprocess and return its result; RunError with its log tail if it
    fails. vLLM's own logging goes to `log_path`."""
    env = dict(os.environ, VLLM_LOGGING_LEVEL=os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"))
    result = None
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvtier.integrations.vllm.workload"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
        )  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(spec))
        proc.stdin.close()
        for line in proc.stdout:
            if not line.startswith('{"event"'):
                log.write(line)  # vLLM prints some of its logs on stdout
                continue
            event = json.loads(line)
            if event["event"] == "done":
                result = event["result"]
            elif on_event is not None:
                on_event(event)
        rc = proc.wait()
    if rc != 0 or result is None:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-25:])
        raise RunError(f"vLLM workload failed (exit {rc}); log {log_path}:\n{tail}")
    return dict(result)


def demo_specs(model: str, s: DemoSettings, workdir: Path) -> tuple[dict[str, Any], ...]:
    chat = {
        "chat": {
            "sessions": s.sessions, "turns": s.turns, "system_tokens": s.system_tokens,
            "user_tokens": s.user_tokens, "seed": s.seed,
        }
    }  # fmt: skip
    block = 32
    max_len = max(s.max_prompt() + block, 2 * block)
    max_len = (max_len + block - 1) // block * block
    engine = {
        "num_gpu_blocks": max(s.gpu_blocks, max_len // block + 1),
        "block_size": block,
        "max_model_len": max_len,
    }
    base = {
        "model": model, "max_tokens": s.max_tokens, "engine": engine, "workload": chat,
        "warmup": True,
    }  # fmt: skip
    kvtier_cfg = {
        "host": {"budget": s.host_budget, "policy": "lru"},
        "tiers": [
            {"kind": "disk", "path": str(workdir / "disk"), "budget": s.disk_budget,
             "mode": "write_through"},
        ],
    }  # fmt: skip
    with_kvtier = dict(
        base, kvtier={"config": kvtier_cfg, "stats_path": str(workdir / "kvtier-stats.json")}
    )
    return dict(base, kvtier=None), with_kvtier


def _ms(values: list[float]) -> float:
    return round(1000 * statistics.fmean(values), 2) if values else 0.0


def summarize(without: dict[str, Any], with_: dict[str, Any], s: DemoSettings) -> dict[str, Any]:
    stats = with_.get("kvtier") or {}
    page_tokens = 32
    loads = int(stats.get("loads", 0))
    later = slice(s.sessions, None)  # turns >= 2: the ones that can reuse a conversation
    return {
        "identical_output": without["outputs"] == with_["outputs"],
        "requests": len(with_["outputs"]),
        "prompt_tokens": sum(with_["prompt_tokens"]),
        "reused_tokens": loads * page_tokens,
        "cached_tokens": {"with": sum(with_["cached"]), "without": sum(without["cached"])},
        "hits": dict(stats.get("hits", {})),
        "ttft_ms": {"with": _ms(with_["ttft_s"]), "without": _ms(without["ttft_s"])},
        "ttft_ms_later_turns": {
            "with": _ms(with_["ttft_s"][later]), "without": _ms(without["ttft_s"][later]),
        },
        "kvtier": {
            k: stats.get(k, 0) for k in ("stores", "loads", "promotions", "evictions", "lookups")
        },
        "startup_s": {"with": round(with_["startup_s"], 1),
                      "without": round(without["startup_s"], 1)},
    }


def run_demo(
    s: DemoSettings,
    *,
    model_dir: str | None = None,
    progress: bool = True,
    workdir: str | None = None,
) -> dict[str, Any]:
    """Build (or reuse) the tiny model, run the chat without then with kvtier, compare."""
    from kvtier.integrations.vllm.tiny_model import build_tiny_model

    model = str(build_tiny_model(s.model, model_dir))
    n_req = s.sessions * s.turns
    bar: Any = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=2 * (n_req + 1), desc="kvtier demo", unit="step", file=sys.stderr)

    def tick(label: str) -> Callable[[dict[str, Any]], None]:
        def on_event(event: dict[str, Any]) -> None:
            if bar is not None:
                bar.set_postfix_str(label)
                bar.update(1)

        return on_event

    with tempfile.TemporaryDirectory(prefix="kvtier-demo-", dir=workdir) as tmp:
        work = Path(tmp)
        spec_without, spec_with = demo_specs(model, s, work)
        if bar is not None:
            bar.set_postfix_str("starting vLLM")
        without = run_workload(spec_without, work / "vllm-without.log", tick("vLLM alone"))
        with_ = run_workload(spec_with, work / "vllm-with.log", tick("vLLM + kvtier"))
    if bar is not None:
        bar.close()
    return summarize(without, with_, s)
