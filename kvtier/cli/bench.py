"""`kvtier bench <name>`: each benchmark lives in its own module `kvtier.cli.bench_<name>`,
exposing `add_arguments(parser)` and `run(args) -> int`."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS: dict[str, str] = {
    "keys": "page-key hashing and prefix lookups per second",
    "policy": "eviction-policy operations per second and hit ratios on generated traces",
    "transfer": "GPU<->host page transfers against the pinned-memcpy ceiling",
    "tiers": "secondary-tier throughput against raw clients and disk sequential I/O",
    "pd": "request KV transfer between instances (NIXL) against peer/local memcpy",
    "ttft": "time to first token with cached prefixes against recompute and the floor",
    "vmm": "elastic device-pool allocation, peer reads and attention over elastic KV",
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("bench", help="run a benchmark")
    bsub = parser.add_subparsers(dest="bench", metavar="NAME", required=True)
    for name, help_text in BENCHMARKS.items():
        try:
            module = importlib.import_module(f"kvtier.cli.bench_{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"kvtier.cli.bench_{name}":
                continue
            raise
        bparser = bsub.add_parser(name, help=help_text)
        module.add_arguments(bparser)
        bparser.set_defaults(func=module.run)
