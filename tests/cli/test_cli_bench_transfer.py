"""`kvtier bench transfer` on a machine without a GPU: the CPU path against memcpy, with the C
row copier and with the torch/numpy copies it falls back to."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from kvtier.transfer import native


@pytest.mark.parametrize("switch", ["1", "0"])
def test_cpu_run_reports_both_ops_against_memcpy(switch: str) -> None:
    if switch == "1" and native.library() is None:
        pytest.skip("kvtier's C row copier is not built here")
    exe = shutil.which("kvtier")
    cmd = [exe] if exe else [sys.executable, "-m", "kvtier"]
    out = subprocess.run(
        [*cmd, "bench", "transfer", "--cpu", "--geometry", "llama3-70b-tp8", "--pages", "8",
         "--reps", "2", "--json"],
        capture_output=True, text=True, timeout=300, check=True,
        env={**os.environ, native.ENV: switch},
    )
    res = json.loads(out.stdout)
    name = "cpu" if switch == "1" else "cpu torch"
    assert res["mode"] == "cpu" and list(res["engine"]) == [name]
    assert res["ceiling"]["memcpy"] > 0
    for op in ("store", "load"):
        assert res["engine"][name][op] > 0 and res["ratios"][name][op] > 0
    assert res["meta"]["geometry"] == "llama3-70b-tp8"
