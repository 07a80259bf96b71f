"""A copy job's argument conversion and checks (kvtier.transfer.job_args): the native check and
the numpy one give the same answer on any input, and every kind of bad input is a ValueError
that names what is wrong."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.transfer import job_args, native

needs_lib = pytest.mark.skipif(native.library() is None,
                               reason="kvtier's native library is not built here")
DKV = SimpleNamespace(blocks_per_page=2, num_blocks=40)
POOL = SimpleNamespace(num_slots=12)


@needs_lib
@settings(max_examples=300, deadline=None)
@given(
    written=st.lists(st.integers(-3, 44), max_size=24),
    other=st.lists(st.integers(-3, 44), max_size=24),
    w_limit=st.integers(1, 41),
    o_limit=st.integers(1, 41),
)
def test_native_check_matches_numpy(
    written: list[int], other: list[int], w_limit: int, o_limit: int
) -> None:
    w, o = np.array(written, np.int64), np.array(other, np.int64)
    if w.size == 0:
        return  # the checks run only for jobs with pages
    if o.size == 0:
        o = np.zeros(1, np.int64)
    assert native.check_job(w, w_limit, o, o_limit) == job_args._check_numpy(w, w_limit, o,
                                                                              o_limit)


@pytest.mark.parametrize("use_native", [pytest.param(True, marks=needs_lib), False])
@pytest.mark.parametrize(
    ("blocks", "slots", "write", "message"),
    [
        ([[0, 1], [2, 3]], [0, 12], True, r"slot out of range \[0, 12\)"),
        ([[0, 1], [2, 40]], [0, 1], True, r"block out of range \[0, 40\)"),
        ([[0, 1], [2, 3]], [5, 5], True, "same slot or block twice"),
        ([[0, 1], [2, 1]], [0, 1], False, "same slot or block twice"),
        ([[0, 1], [2, 3]], [-1, 1], False, r"slot out of range \[0, 12\)"),
        ([[0, -1], [2, 3]], [0, 1], False, r"block out of range \[0, 40\)"),
        ([[0, 1], [2, 40]], [0, 12], False, "block out of range"),  # written side first
        ([[0, 1], [2, 40]], [0, 12], True, "slot out of range"),
        ([[0, 1], [2]], [0, 1], True, "rows of different lengths"),
        ([[0, 1], [2, 3]], [0], True, "1 pages need 2 blocks each, got 4"),
        ([[0.5, 1], [2, 3]], [0, 1], True, "integers"),
        (torch.tensor([[0.0, 1.0]]), [0], True, "integers"),
    ],
)
def test_bad_input_is_a_value_error(
    blocks: object, slots: list[int], write: bool, message: str, use_native: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not use_native:
        monkeypatch.setattr(native, "library", lambda: None)
    with pytest.raises(ValueError, match=message):
        job_args.normalize_job_args(blocks, slots, DKV, POOL, write=write)  # type: ignore[arg-type]


@pytest.mark.parametrize("use_native", [pytest.param(True, marks=needs_lib), False])
def test_good_input_in_every_form(use_native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not use_native:
        monkeypatch.setattr(native, "library", lambda: None)
    want_b, want_s = [[4, 5], [0, 39]], [11, 0]
    forms = [
        (want_b, want_s),
        (torch.tensor(want_b, dtype=torch.int32), torch.tensor(want_s)),
        (np.array(want_b, dtype=np.uint16), np.array(want_s)),
        (torch.tensor(want_b).t().contiguous().t(), tuple(want_s)),  # a non-contiguous view
        ([4, 5, 0, 39], want_s),  # flat blocks
    ]
    for blocks, slots in forms:
        for write in (True, False):
            blk, sl = job_args.normalize_job_args(blocks, slots, DKV, POOL,  # type: ignore[arg-type]
                                                  write=write)
            assert blk.dtype == sl.dtype == torch.int64
            assert blk.tolist() == want_b and sl.tolist() == want_s
    blk, sl = job_args.normalize_job_args([], [], DKV, POOL, write=True)  # type: ignore[arg-type]
    assert blk.shape == (0, 2) and sl.shape == (0,)
