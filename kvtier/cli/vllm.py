"""`kvtier vllm-args` and `kvtier demo`: kvtier inside vLLM.

    vllm serve MODEL --kv-transfer-config "$(kvtier vllm-args --config kvtier.yaml)"

`vllm-args` validates the kvtier config and prints the one-line `--kv-transfer-config` JSON
(the config is embedded, so the engine needs no file). `demo` runs a multi-turn chat on a tiny
random Llama twice, with vLLM alone and with kvtier (host memory + a local disk directory), and
prints per-tier hits, prompt tokens not recomputed and time to first token for both runs; with
`--json` it prints exactly one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from kvtier.cache import CacheConfig
from kvtier.errors import ConfigError
from kvtier.integrations.vllm.demo import DemoSettings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "vllm-args",
        help="print vLLM's --kv-transfer-config JSON for a kvtier config",
        description="Print the --kv-transfer-config JSON that turns kvtier on in vLLM.",
    )
    p.add_argument("--config", type=Path, help="kvtier YAML config (default: embedded default)")
    p.add_argument("--block-size", type=int, help="tokens per kvtier page (k * vLLM block size)")
    p.add_argument("--run-id", help="name of the shared host pool (default: vLLM's engine id)")
    p.add_argument("--pretty", action="store_true", help="indent the JSON")
    p.set_defaults(func=cmd_vllm_args)

    d = sub.add_parser(
        "demo",
        help="multi-turn chat on vLLM with and without kvtier",
        description="Serve a multi-turn chat on a tiny random Llama with vLLM, without and with "
        "kvtier, and compare per-tier hits, reused prompt tokens, TTFT and output tokens.",
    )
    d.add_argument("--json", action="store_true", help="print one JSON object")
    dflt = DemoSettings()
    d.add_argument("--sessions", type=int, default=dflt.sessions, help="conversations")
    d.add_argument("--turns", type=int, default=dflt.turns, help="turns per conversation")
    d.add_argument("--system-tokens", type=int, default=dflt.system_tokens,
                   help="shared system prompt length")  # fmt: skip
    d.add_argument("--user-tokens", type=int, default=dflt.user_tokens,
                   help="new user tokens per turn")  # fmt: skip
    d.add_argument("--max-tokens", type=int, default=dflt.max_tokens,
                   help="tokens generated per turn")  # fmt: skip
    d.add_argument("--gpu-blocks", type=int, default=dflt.gpu_blocks,
                   help="vLLM KV blocks of 32 tokens (default: one conversation's worth)")
    d.add_argument("--host-budget", default=dflt.host_budget, help="kvtier host tier budget")
    d.add_argument("--model", choices=("demo", "llama"), default=dflt.model,
                   help="tiny random model: demo (4 layers, hidden 512) or llama (2 x 128)")
    d.add_argument("--model-dir", help="where the tiny model is cached (~/.cache/kvtier/models)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_demo)


def vllm_args(config: Path | None, block_size: int | None, run_id: str | None) -> dict[str, Any]:
    """The kv_transfer_config document; ConfigError for a config kvtier would refuse."""
    from kvtier.integrations.vllm import kv_transfer_config

    data: dict[str, Any] | None = None
    if config is not None:
        CacheConfig.load(config)  # fail here, not at engine start
        data = dict(yaml.safe_load(config.read_text()) or {})
    if block_size is not None and block_size <= 0:
        raise ConfigError("--block-size", block_size, "a positive multiple of vLLM's block size")
    return kv_transfer_config(data, run_id=run_id, block_size=block_size)


def cmd_vllm_args(args: argparse.Namespace) -> int:
    doc = vllm_args(args.config, args.block_size, args.run_id)
    print(json.dumps(doc, indent=2 if args.pretty else None))
    return 0


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(name, value, "a positive integer")


def cmd_demo(args: argparse.Namespace) -> int:
    from kvtier.integrations.vllm.demo import run_demo
    from kvtier.units import parse_size

    for name in ("sessions", "turns", "system_tokens", "user_tokens", "max_tokens"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    if args.gpu_blocks < 0:
        raise ConfigError("--gpu-blocks", args.gpu_blocks, "0 (automatic) or a positive count")
    parse_size(args.host_budget, "--host-budget")
    settings = DemoSettings(
        sessions=args.sessions,
        turns=args.turns,
        system_tokens=args.system_tokens,
        user_tokens=args.user_tokens,
        max_tokens=args.max_tokens,
        gpu_blocks=args.gpu_blocks,
        host_budget=args.host_budget,
        model=args.model,
    )
    report = run_demo(settings, model_dir=args.model_dir, progress=not args.no_progress)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
    return 0 if report["identical_output"] else 1


def format_report(r: dict[str, Any]) -> str:
    hits = ", ".join(f"{k}={v}" for k, v in r["hits"].items()) or "none"
    lines = [
        f"kvtier demo: {r['requests']} chat requests, {r['prompt_tokens']} prompt tokens",
        "",
        f"{'':28}{'vLLM alone':>14}{'vLLM + kvtier':>16}",
        f"{'prompt tokens from cache':28}{r['cached_tokens']['without']:>14}"
        f"{r['cached_tokens']['with']:>16}",
        f"{'mean TTFT (ms)':28}{r['ttft_ms']['without']:>14.2f}{r['ttft_ms']['with']:>16.2f}",
        f"{'mean TTFT, turns >= 2 (ms)':28}{r['ttft_ms_later_turns']['without']:>14.2f}"
        f"{r['ttft_ms_later_turns']['with']:>16.2f}",
        "",
        f"prompt tokens kvtier served (not recomputed): {r['reused_tokens']}",
        f"pages loaded per tier: {hits}",
        "kvtier: " + ", ".join(f"{k}={v}" for k, v in r["kvtier"].items()),
        f"generated tokens identical with and without kvtier: {r['identical_output']}",
    ]
    return "\n".join(lines)
