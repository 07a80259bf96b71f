"""`kvtier bench keys`: page-key hashing and prefix lookups per second on one core.

The lookup figure is the engine's hot path: one `TieredCache.lookup` over a 256-page prefix
that is fully resident, so every key is checked (goal: >= 1,000,000 keys/s).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from kvtier.cache import TieredCache
from kvtier.geometry import KVGeometry
from kvtier.keys import Namespace, key_from_engine_hash, page_keys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pages", type=int, default=256, help="prefix length in pages")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    parser.add_argument("--json", action="store_true")


def _rate(call: Callable[[], object], per_call: int, seconds: float) -> float:
    call()
    n = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(50):
            call()
        n += 50
    return n * per_call / elapsed


def run(args: argparse.Namespace) -> int:
    geom = KVGeometry(2, 1, 32, 16, "float16")  # tiny pages: this measures bookkeeping only
    ns = Namespace("bench-model", geom)
    tokens = list(range(args.pages * geom.page_size))
    keys = page_keys(ns, tokens)
    cache = TieredCache({"host": {"budget": (args.pages + 8) * 8192}}, ns, background=False)
    plan = cache.prepare_store(keys)
    assert plan is not None and len(plan.keys) == args.pages
    cache.complete_store(plan.keys)
    assert cache.lookup(keys).hits == args.pages
    miss = page_keys(Namespace("other", geom), tokens)
    engine_hashes = [k[::-1] for k in keys]
    result = {
        "pages": args.pages,
        "lookup_hit_keys_per_s": _rate(lambda: cache.lookup(keys), args.pages, args.seconds),
        "lookup_first_miss_per_s": _rate(lambda: cache.lookup(miss), 1, args.seconds / 2),
        "touch_keys_per_s": _rate(lambda: cache.touch(keys), args.pages, args.seconds / 2),
        "hash_tokens_pages_per_s": _rate(lambda: page_keys(ns, tokens), args.pages, args.seconds),
        "key_from_engine_hash_per_s": _rate(
            lambda: [key_from_engine_hash(ns, h) for h in engine_hashes], args.pages, args.seconds
        ),
        "goal_lookup_keys_per_s": 1_000_000,
    }
    cache.close()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        width = max(map(len, result))
        for name, value in result.items():
            print(f"{name:<{width}}  {value:>14,.0f}")
    return 0
