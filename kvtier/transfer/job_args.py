"""Conversion and validation of a copy-engine job's blocks and slots.

`submit_store` / `submit_load` take blocks as nested sequences or a tensor and slots as a
sequence or tensor; every path below the engine takes int64 CPU tensors (blocks `[N, n]`, slots
`[N]`) that are already range-checked. Checking once here, at submit, makes malformed input a
ValueError for the caller instead of a failed job. A submit is on the critical path of a
transfer (no copy starts before it returns): the checks run in one call of kvtier's native
library (kvtier.transfer.native) where it is built, else in numpy (several times faster than
torch's per-op dispatch on 512 pages).
"""

from __future__ import annotations

import array
import itertools
from collections.abc import Iterable, Sequence
from typing import cast

import numpy as np
import torch

from kvtier.memory.host_pool import HostPool
from kvtier.transfer import native
from kvtier.transfer.device_kv import DeviceKV


def _int64(values: object, what: str) -> np.ndarray:
    """`values` as an int64 array: a tensor or array of integers, a flat sequence of ints (read
    through array.array, several times faster than numpy's element-wise inference), or a
    sequence of equal-length sequences of ints (2-D)."""
    if isinstance(values, torch.Tensor):
        t = values.detach()
        if t.dtype is not torch.int64 or t.device.type != "cpu":  # else a no-op costing us
            if t.is_floating_point() or t.is_complex():
                raise ValueError(f"{what} must be integers, got {t.dtype}")
            t = t.to(device="cpu", dtype=torch.int64)
        return t.numpy()
    if isinstance(values, np.ndarray):
        if values.size and values.dtype.kind not in "iu":
            raise ValueError(f"{what} must be integers, got {values.dtype}")
        return values.astype(np.int64, copy=False)
    try:
        return np.frombuffer(array.array("q", cast(Iterable[int], values)), dtype=np.int64)
    except TypeError:
        pass  # nested, or not integers
    try:
        rows = list(cast(Iterable[Sequence[int]], values))
        widths = set(map(len, rows))
        flat = array.array("q", itertools.chain.from_iterable(rows))
    except (TypeError, OverflowError) as exc:
        raise ValueError(f"{what} must be integers or rows of integers ({exc})") from None
    if len(widths) > 1:
        raise ValueError(f"{what}: rows of different lengths {sorted(widths)}")
    return np.frombuffer(flat, dtype=np.int64).reshape(len(rows), -1)


def normalize_job_args(
    blocks: Sequence[Sequence[int]] | torch.Tensor,
    slots: Sequence[int],
    dkv: DeviceKV,
    pool: HostPool,
    *,
    write: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks as int64 CPU `[N, n]`, n = blocks per page; slots as int64 CPU `[N]`).
    `write`: the job writes the slots (a store), else the blocks (a load); those must be
    distinct. Raises ValueError on a count mismatch, non-integer or ragged input, an
    out-of-range slot or block, or a target written twice."""
    n = dkv.blocks_per_page
    sl = _int64(slots, "slots").reshape(-1)
    blk = _int64(blocks, "blocks")
    if blk.size != sl.size * n:
        raise ValueError(f"{sl.size} pages need {n} blocks each, got {blk.size}")
    blk = blk.reshape(sl.size, n)
    if sl.size:
        _check(sl, blk, pool.num_slots, dkv.num_blocks, write)
    return torch.from_numpy(blk), torch.from_numpy(sl)


def _check(sl: np.ndarray, blk: np.ndarray, num_slots: int, num_blocks: int, write: bool) -> None:
    """The range and duplicate checks, in kvtier's native library where it is built (one call)
    else in numpy; both report the first failure in the same order: the written side's range,
    the other side's range, then a target written twice."""
    written, other = (sl, blk) if write else (blk, sl)
    w_limit, o_limit = (num_slots, num_blocks) if write else (num_blocks, num_slots)
    w_name, o_name = ("slot", "block") if write else ("block", "slot")
    if native.library() is not None:
        code = native.check_job(np.ascontiguousarray(written).reshape(-1), w_limit,
                                np.ascontiguousarray(other).reshape(-1), o_limit)
    else:
        code = _check_numpy(written.reshape(-1), w_limit, other, o_limit)
    if code == native.WRITTEN_RANGE:
        raise ValueError(f"{w_name} out of range [0, {w_limit})")
    if code == native.OTHER_RANGE:
        raise ValueError(f"{o_name} out of range [0, {o_limit})")
    if code == native.WRITTEN_TWICE:
        raise ValueError("a job must not write the same slot or block twice")
    if code:
        raise MemoryError("no memory to check a copy job's targets")


def _check_numpy(written: np.ndarray, w_limit: int, other: np.ndarray, o_limit: int) -> int:
    """native.check_job's answer, in numpy: the written side sorted once for its range and its
    duplicates."""
    w = np.sort(written)
    if w[0] < 0 or w[-1] >= w_limit:
        return native.WRITTEN_RANGE
    if other.min() < 0 or other.max() >= o_limit:
        return native.OTHER_RANGE
    if (w[1:] == w[:-1]).any():
        return native.WRITTEN_TWICE
    return 0
