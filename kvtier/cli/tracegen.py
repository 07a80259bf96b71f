"""Deterministic page-key traces for eviction-policy benchmarks.

Each generator takes ``(accesses, seed)`` and returns exactly ``accesses`` keys (strings, one
page each); the same arguments always give the same trace. ``bench/traces.py`` writes them to
files for ``kvtier sim``; ``kvtier bench policy`` replays them in memory.

- ``scan``: a hot working set read at random, interrupted by long one-time scans (a batch job or
  a burst of unrelated long prompts) that flush a recency-only cache.
- ``chat``: multi-turn chat. Sessions start from one of a few shared system prompts (popular
  ones more often); each turn reads the whole prefix (system pages, then the session's earlier
  pages) and appends the new user + assistant pages, so prefixes grow turn by turn.
- ``zipf``: independent requests over a million keys with Zipf popularity (alpha 1.0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def scan_heavy(
    accesses: int, seed: int, hot: int = 4000, phase: int = 12000, scan: int = 6000
) -> list[str]:
    """Alternate ``phase`` uniform reads of ``hot`` keys with a scan of ``scan`` new keys."""
    rng = np.random.default_rng(seed)
    hot_keys = [f"hot:{i}" for i in range(hot)]
    out: list[str] = []
    n_scans = 0
    while len(out) < accesses:
        out.extend(hot_keys[i] for i in rng.integers(0, hot, size=phase))
        out.extend(f"scan:{n_scans}:{i}" for i in range(scan))
        n_scans += 1
    del out[accesses:]
    return out


def chat(
    accesses: int, seed: int, prompts: int = 16, active: int = 48, mean_turns: float = 6.0
) -> list[str]:
    """Sessions over shared system prompts whose page prefixes grow turn by turn."""
    rng = np.random.default_rng(seed)
    prompt_pages = [
        [f"sys:{p}:{i}" for i in range(int(n))]
        for p, n in enumerate(rng.integers(8, 65, size=prompts))
    ]
    popularity = 1.0 / np.arange(1, prompts + 1)
    popularity /= popularity.sum()
    # one live session: [session id, its system pages, its own pages so far, turns left]
    next_id = 0

    def new_session() -> tuple[int, list[str], list[str], int]:
        nonlocal next_id
        next_id += 1
        sys_pages = prompt_pages[int(rng.choice(prompts, p=popularity))]
        return next_id, sys_pages, [], int(rng.geometric(1.0 / mean_turns))

    sessions = [new_session() for _ in range(active)]
    out: list[str] = []
    while len(out) < accesses:
        s = int(rng.integers(0, active))
        sid, sys_pages, own, turns_left = sessions[s]
        out.extend(sys_pages)
        out.extend(own)
        new_pages = int(rng.integers(1, 5)) + int(rng.integers(1, 5))  # user + reply pages
        fresh = [f"conv:{sid}:{len(own) + j}" for j in range(new_pages)]
        own.extend(fresh)
        out.extend(fresh)
        sessions[s] = (sid, sys_pages, own, turns_left - 1) if turns_left > 1 else new_session()
    del out[accesses:]
    return out


def zipf(accesses: int, seed: int, alpha: float = 1.0, keys: int = 1_000_000) -> list[str]:
    """Independent draws over ``keys`` keys, P(rank r) proportional to r ** -alpha."""
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(np.arange(1, keys + 1, dtype=np.float64) ** -alpha)
    cdf /= cdf[-1]
    ranks = np.searchsorted(cdf, rng.random(accesses), side="right")
    return [f"z:{r}" for r in ranks.tolist()]


@dataclass(frozen=True)
class TraceSpec:
    """A named trace and the capacities (pages) worth comparing policies at."""

    name: str
    generate: Callable[[int, int], list[str]]
    capacities: tuple[int, ...]
    description: str


TRACES: dict[str, TraceSpec] = {
    t.name: t
    for t in (
        TraceSpec(
            "scan",
            scan_heavy,
            (2000, 5000, 10000),
            "4k-page hot set, 12k random reads then a 6k-page one-time scan, repeated",
        ),
        TraceSpec(
            "chat",
            chat,
            (500, 2000, 8000),
            "48 live multi-turn sessions over 16 shared system prompts (8-64 pages)",
        ),
        TraceSpec("zipf", zipf, (1000, 10000, 50000), "Zipf alpha 1.0 over 1M keys"),
    )
}
