"""Fixtures shared by the transfer tests."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest
import torch
from triton_interp import interpreted_kernels


@pytest.fixture(scope="module")
def kernels() -> Iterator[ModuleType]:
    """kvtier's Triton kernels: compiled on a GPU, under Triton's interpreter on the CPU. Only
    requested by suites that skip where triton is not installed."""
    if torch.cuda.is_available():
        from kvtier.transfer import triton_kernels

        yield triton_kernels
        return
    with interpreted_kernels() as mod:
        yield mod
