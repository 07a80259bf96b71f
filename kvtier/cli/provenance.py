"""Which code produced a benchmark result."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def commit(short: bool = True) -> str:
    """The commit being measured: $KVTIER_COMMIT when set (device copies of the tree may carry a
    stale .git), else `git rev-parse` of the checkout this package lives in, else "unknown"."""
    named = os.environ.get("KVTIER_COMMIT")
    if named:
        return named
    cmd = ["git", "rev-parse", *(["--short"] if short else []), "HEAD"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False,
                             cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"
