"""`kvtier sim`: replay a key trace through an eviction policy and report its hit ratio.

The trace file holds one key per line (any string; keys may repeat; empty lines are skipped).
With ``--json`` the command prints exactly one JSON object with ``policy``, ``capacity``,
``accesses``, ``hits``, ``misses`` and ``hit_ratio`` (hits / accesses, 0.0 for an empty trace).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from kvtier.errors import ConfigError
from kvtier.policy import POLICIES, ReplayResult, make_policy, replay


def read_trace(path: Path) -> Iterator[str]:
    """Keys of a one-key-per-line trace file, line endings and empty lines dropped."""
    with path.open("r", encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            key = line.rstrip("\r\n")
            if key:
                yield key


def simulate(policy: str, capacity: int, trace: Path) -> ReplayResult:
    """Replay ``trace`` through a fresh ``policy`` of ``capacity`` pages.

    Raises ConfigError for a bad policy name or capacity, or a trace that is not a readable file.
    """
    if capacity <= 0:
        raise ConfigError("--capacity", capacity, "a positive number of pages")
    if not trace.is_file():
        raise ConfigError("--trace", str(trace), "an existing file with one key per line")
    return replay(make_policy(policy, capacity), read_trace(trace))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "sim",
        help="replay a key trace through an eviction policy",
        description="Replay FILE (one key per line) through a policy of N pages; "
        "a resident key is a hit, a miss inserts the key (evicting one when full).",
    )
    parser.add_argument("--policy", choices=sorted(POLICIES), default="lru")
    parser.add_argument("--capacity", type=int, required=True, metavar="N", help="pages")
    parser.add_argument("--trace", type=Path, required=True, metavar="FILE")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        result = simulate(args.policy, args.capacity, args.trace)
    except (ConfigError, OSError) as exc:
        print(f"kvtier sim: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(
            f"{result.policy} capacity={result.capacity}: {result.hits} hits, "
            f"{result.misses} misses of {result.accesses} accesses, "
            f"hit ratio {result.hit_ratio:.4f}"
        )
    return 0
