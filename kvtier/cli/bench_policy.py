"""`kvtier bench policy`: eviction-policy throughput and hit ratios on generated traces.

Throughput: a cache-like loop (access on a hit; evict one and insert on a miss) over Zipf
(alpha 0.9) keys from a space 5x the capacity, timed on one core; every insert, access and evict
call counts as one operation. Hit ratios: each policy replays each trace of
``kvtier.cli.tracegen.TRACES`` at that trace's capacities.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.cli import provenance
from kvtier.cli.tracegen import TRACES
from kvtier.errors import ConfigError
from kvtier.policy import POLICIES, make_policy, replay

OPS_CAPACITY = 10_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--accesses", type=int, default=200_000, metavar="N", help="accesses per trace and run"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--policies", default=",".join(POLICIES), help="comma-separated subset of policies"
    )


def machine() -> dict[str, Any]:
    """CPU model, usable cores, date and git commit of the working directory."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = provenance.commit()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_used": 1,
        "python": platform.python_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "commit": commit or None,
    }


def ops_per_second(name: str, accesses: int, seed: int) -> dict[str, Any]:
    """Time ``accesses`` cache-like requests through a fresh policy of OPS_CAPACITY pages."""
    rng = np.random.default_rng(seed)
    space = 5 * OPS_CAPACITY
    cdf = np.cumsum(np.arange(1, space + 1, dtype=np.float64) ** -0.9)
    keys = np.searchsorted(cdf / cdf[-1], rng.random(accesses), side="right").tolist()
    policy = make_policy(name, OPS_CAPACITY)
    contains, access, insert, evict = (
        policy.__contains__,
        policy.access,
        policy.insert,
        policy.evict,
    )
    capacity = OPS_CAPACITY
    evictions = 0
    t0 = time.perf_counter()
    for key in keys:
        if contains(key):
            access(key)
        else:
            if len(policy) >= capacity:
                evict(1)
                evictions += 1
            insert(key)
    seconds = time.perf_counter() - t0
    ops = accesses + evictions  # every request is one access or one insert, plus evictions
    policy.check_integrity()
    return {
        "policy": name,
        "capacity": OPS_CAPACITY,
        "requests": accesses,
        "ops": ops,
        "evictions": evictions,
        "seconds": round(seconds, 4),
        "ops_per_s": round(ops / seconds),
        "ns_per_op": round(seconds / ops * 1e9, 1),
    }


def hit_ratios(names: list[str], accesses: int, seed: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for spec in TRACES.values():
        keys = spec.generate(accesses, seed)
        distinct = len(set(keys))
        for capacity in spec.capacities:
            for name in names:
                res = replay(make_policy(name, capacity), keys)
                rows.append(
                    {
                        "trace": spec.name,
                        "distinct": distinct,
                        **res.as_dict(),
                        "hit_ratio": round(res.hit_ratio, 4),
                    }
                )
    return rows


def run(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    for n in names:
        make_policy(n, 1)  # ConfigError naming the allowed policies
    if args.accesses <= 0:
        raise ConfigError("--accesses", args.accesses, "a positive number of requests")
    info = machine()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as advertised
    result = {
        "benchmark": "policy",
        "machine": info,
        "accesses": args.accesses,
        "seed": args.seed,
        "traces": {t.name: t.description for t in TRACES.values()},
        "ops": [ops_per_second(n, args.accesses, args.seed) for n in names],
        "hit_ratios": hit_ratios(names, args.accesses, args.seed),
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(render(result))
    return 0


def render(result: dict[str, Any]) -> str:
    """The result as plain-text tables."""
    m = result["machine"]
    lines = [
        f"policy benchmark - {m['cpu']}, {m['cores']} cores, one used; "
        f"{m['date']}, commit {m['commit']}",
        "",
        f"{'policy':8} {'ops/s':>12} {'ns/op':>8}   ({OPS_CAPACITY}-page policy, "
        f"{result['accesses']} Zipf-0.9 requests)",
    ]
    lines += [f"{r['policy']:8} {r['ops_per_s']:>12,} {r['ns_per_op']:>8}" for r in result["ops"]]
    names = [r["policy"] for r in result["ops"]]
    lines += ["", f"{'trace':6} {'pages':>7} " + " ".join(f"{n:>8}" for n in names)]
    table: dict[tuple[str, int], dict[str, float]] = {}
    for row in result["hit_ratios"]:
        table.setdefault((row["trace"], row["capacity"]), {})[row["policy"]] = row["hit_ratio"]
    for (trace, capacity), ratios in table.items():
        cells = " ".join(f"{ratios[n]:>8.4f}" for n in names)
        lines.append(f"{trace:6} {capacity:>7} {cells}")
    return "\n".join(lines)
