"""Conversion and validation of a copy-engine job's blocks and slots.

`submit_store` / `submit_load` take blocks as nested sequences or a tensor and slots as a
sequence or tensor; every path below the engine takes int64 CPU tensors (blocks `[N, n]`, slots
`[N]`) that are already range-checked. Checking once here, at submit, makes malformed input a
ValueError for the caller instead of a failed job.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtier.memory.host_pool import HostPool
from kvtier.transfer.device_kv import DeviceKV


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
    distinct. Raises ValueError on a count mismatch, an out-of-range slot or block, or a target
    written twice."""
    n = dkv.blocks_per_page
    slot_t = torch.as_tensor(list(slots) if not isinstance(slots, torch.Tensor) else slots)
    slot_t = slot_t.to(device="cpu", dtype=torch.int64).reshape(-1)
    if isinstance(blocks, torch.Tensor):
        blk = blocks.to(device="cpu", dtype=torch.int64)
    else:
        blk = torch.tensor([list(b) for b in blocks], dtype=torch.int64)
    if blk.numel() != slot_t.numel() * n:
        raise ValueError(f"{slot_t.numel()} pages need {n} blocks each, got {blk.numel()}")
    blk = blk.reshape(slot_t.numel(), n)
    if slot_t.numel():
        if int(slot_t.min()) < 0 or int(slot_t.max()) >= pool.num_slots:
            raise ValueError(f"slot out of range [0, {pool.num_slots})")
        if int(blk.min()) < 0 or int(blk.max()) >= dkv.num_blocks:
            raise ValueError(f"block out of range [0, {dkv.num_blocks})")
        dup = slot_t if write else blk.reshape(-1)
        if torch.unique(dup).numel() != dup.numel():
            raise ValueError("a job must not write the same slot or block twice")
    return blk, slot_t
