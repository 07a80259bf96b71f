"""kvtier's native row copier (kvtier.transfer.native.copy_rows) on its own: every row lands
where it is sent, byte for byte, with and without non-temporal stores, aligned or not; nothing
else moves. (Its job check is held to the numpy one in test_job_args.)"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.transfer import native

needs_lib = pytest.mark.skipif(
    native.library() is None and shutil.which("cc") is None,
    reason="no C compiler on this machine: kvtier installs without its row copier",
)


@needs_lib
def test_library_is_built() -> None:
    """Where a compiler exists the install builds it (setup.py); a silent fallback would hide a
    broken build behind the slower path."""
    assert native.library() is not None


@needs_lib
@settings(max_examples=80, deadline=None)
@given(
    length=st.sampled_from([1, 7, 16, 64, 100, 256, 4096, 4160]),
    rows=st.integers(0, 24),
    shift=st.sampled_from([0, 1, 8, 16]),
    nontemporal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rows_land_exactly(
    length: int, rows: int, shift: int, nontemporal: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    slots = 32
    src = rng.integers(0, 256, size=slots * length + 64, dtype=np.uint8)
    dst = np.full(slots * length + 64, 0xA5, dtype=np.uint8)
    want = dst.copy()
    frm = rng.permutation(slots)[:rows]
    to = rng.permutation(slots)[:rows]
    for f, t in zip(frm.tolist(), to.tolist()):
        want[shift + t * length : shift + (t + 1) * length] = src[f * length : (f + 1) * length]
    d = (dst.ctypes.data + shift + to * length).astype(np.int64)
    s = (src.ctypes.data + frm * length).astype(np.int64)
    native.copy_rows(d, s, length, nontemporal)
    assert np.array_equal(dst, want)


@needs_lib
def test_refuses_mismatched_address_arrays() -> None:
    a = np.zeros(4, dtype=np.int64)
    with pytest.raises(ValueError, match="one shape"):
        native.copy_rows(a, np.zeros(3, dtype=np.int64), 8, False)
    with pytest.raises(ValueError, match="int64"):
        native.copy_rows(a, a.astype(np.int32), 8, False)
    with pytest.raises(ValueError, match="contiguous"):
        native.copy_rows(np.zeros(8, dtype=np.int64)[::2], a, 8, False)


def test_switched_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    native.library.cache_clear()
    monkeypatch.setenv(native.ENV, "0")
    try:
        assert native.library() is None
        with pytest.raises(RuntimeError, match="not built"):
            native.copy_rows(np.zeros(1, np.int64), np.zeros(1, np.int64), 8, False)
    finally:
        monkeypatch.delenv(native.ENV)
        native.library.cache_clear()
