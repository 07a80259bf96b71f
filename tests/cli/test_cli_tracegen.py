"""Trace generators: deterministic, exact length, and shaped like what they claim to model."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from kvtier.cli.tracegen import TRACES, chat, scan_heavy, zipf

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(TRACES))
def test_deterministic_and_exact_length(name: str) -> None:
    gen = TRACES[name].generate
    a = gen(5000, 7)
    assert len(a) == 5000 and all(isinstance(k, str) and k and "\n" not in k for k in a)
    assert a == gen(5000, 7)
    assert a != gen(5000, 8)


def test_scan_keys_are_never_repeated_and_hot_keys_are() -> None:
    keys = scan_heavy(60_000, 1)
    counts = Counter(keys)
    scans = [k for k in counts if k.startswith("scan:")]
    assert len(scans) >= 6000 and all(counts[k] == 1 for k in scans)
    hot = [k for k in counts if k.startswith("hot:")]
    assert len(hot) <= 4000 and sum(counts[k] for k in hot) > 30_000


def test_chat_sessions_share_system_pages_and_grow_their_prefix() -> None:
    keys = chat(50_000, 1)
    sessions_per_prompt: dict[str, set[str]] = {}
    prev_sys: str | None = None
    for k in keys:
        kind, ident, _ = k.split(":")
        if kind == "sys":
            prev_sys = ident
        elif prev_sys is not None:
            sessions_per_prompt.setdefault(prev_sys, set()).add(ident)
    # the popular prompts serve many sessions: their pages are shared prefixes
    assert max(len(s) for s in sessions_per_prompt.values()) > 20
    # a session's first page is read again on every later turn
    first_pages = Counter(k for k in keys if k.startswith("conv:") and k.endswith(":0"))
    assert max(first_pages.values()) >= 3


def test_zipf_is_skewed() -> None:
    counts = Counter(zipf(100_000, 1))
    top = counts.most_common(10)
    assert top[0][0] == "z:0"
    assert sum(c for _, c in top) > 0.15 * 100_000
    assert len(counts) > 20_000


def test_bench_traces_script_writes_files_kvtier_sim_reads(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "traces.py"),
            "--out",
            str(tmp_path),
            "--accesses",
            "3000",
            "--only",
            "chat",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "chat.txt: 3000 accesses" in out.stdout
    lines = (tmp_path / "chat.txt").read_text().splitlines()
    assert lines == chat(3000, 1)
    sim = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvtier",
            "sim",
            "--policy",
            "arc",
            "--capacity",
            "500",
            "--trace",
            str(tmp_path / "chat.txt"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(sim.stdout)["accesses"] == 3000
