"""Conversion and validation of a copy-engine job's blocks and slots.

`submit_store` / `submit_load` take blocks as nested sequences or a tensor and slots as a
sequence or tensor; every path below the engine takes int64 CPU tensors (blocks `[N, n]`, slots
`[N]`) that are already range-checked. Checking once here, at submit, makes malformed input a
ValueError for the caller instead of a failed job. The checks run in numpy: a submit is on the
critical path of a transfer (no copy starts before it returns), and numpy does them on 512
pages several times faster than torch's per-op dispatch.
"""

from __future__ import annotations

import array
import itertools
from collections.abc import Iterable, Sequence
from typing import cast

import numpy as np
import torch

from kvtier.memory.host_pool import HostPool
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
        # the written side sorted once: its range and its duplicates in one pass
        written = np.sort(sl if write else blk.reshape(-1))
        other = blk if write else sl
        w_range, o_range = (written[0], written[-1]), (other.min(), other.max())
        (s_lo, s_hi), (b_lo, b_hi) = (w_range, o_range) if write else (o_range, w_range)
        if s_lo < 0 or s_hi >= pool.num_slots:
            raise ValueError(f"slot out of range [0, {pool.num_slots})")
        if b_lo < 0 or b_hi >= dkv.num_blocks:
            raise ValueError(f"block out of range [0, {dkv.num_blocks})")
        if (written[1:] == written[:-1]).any():
            raise ValueError("a job must not write the same slot or block twice")
    return torch.from_numpy(blk), torch.from_numpy(sl)
