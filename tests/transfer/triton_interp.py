"""kvtier's Triton kernels module reloaded under Triton's CPU interpreter (TRITON_INTERPRET=1),
for tests that check the kernels' index arithmetic on CPU tensors."""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from types import ModuleType


@contextlib.contextmanager
def interpreted_kernels() -> Iterator[ModuleType]:
    """The kernels module compiled for the interpreter; the environment and the module are
    restored on exit."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    from kvtier.transfer import triton_kernels

    try:
        yield importlib.reload(triton_kernels)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
        importlib.reload(triton_kernels)
