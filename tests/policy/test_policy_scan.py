"""Scan resistance: a hot loop interleaved with one-time scans."""

from __future__ import annotations

from kvtier.policy import make_policy, replay


def loop_plus_scan(hot: int = 40, scan: int = 60, rounds: int = 100) -> list[str]:
    trace: list[str] = []
    for r in range(rounds):
        for _ in range(3):
            trace += [f"hot{i}" for i in range(hot)]
        trace += [f"scan{r}-{i}" for i in range(scan)]
    return trace


def test_arc_and_s3fifo_beat_lru_on_loop_plus_scan() -> None:
    trace = loop_plus_scan()
    ratios = {
        name: replay(make_policy(name, 50), trace).hit_ratio for name in ("lru", "arc", "s3fifo")
    }
    # each scan flushes LRU's hot loop; ARC and S3-FIFO keep most of it
    assert ratios["arc"] > ratios["lru"] + 0.1, ratios
    assert ratios["s3fifo"] > ratios["lru"] + 0.1, ratios
