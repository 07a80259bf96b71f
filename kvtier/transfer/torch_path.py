"""The torch path: page transfers as tensor indexing (index_select / index_copy_).

This is the reference every other path is compared with bit for bit (the copy engine's CPU path,
kvtier.transfer.cpu_rows, included) and the GPU fallback when neither the Triton kernels nor
batched DMA are available. Data
moves on integer views of the element size, so every dtype (fp8 on CPU builds included) and every
NaN payload is copied exactly.

Shapes used throughout: `blocks` is an int64 `[N, n]` tensor (n = blocks per page), `slots` an
int64 `[N]` tensor of host slots, both on the CPU unless said otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from kvtier.memory.host_pool import HostPool
from kvtier.transfer.device_kv import DeviceKV

_MOVE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

# Pages per gather step on the CPU: small enough that the staging rows stay in cache.
_CPU_STEP_BYTES = 4 << 20
# From this item size on, one row copy per item (a single pass over the bytes) beats a gather
# into a temporary plus a scatter (two passes); below it the per-item Python cost dominates.
_CPU_LOOP_MIN_ITEM = 16384


def move_dtype(itemsize: int) -> torch.dtype:
    return _MOVE[itemsize]


def widest_divisor(values: Iterable[int], sizes: Sequence[int] = (8, 4, 2)) -> int:
    """The first of `sizes` (largest first) dividing every value, else 1: the widest element
    (or vector) that addresses, strides and row lengths all allow."""
    vals = list(values)
    return next((s for s in sizes if all(v % s == 0 for v in vals)), 1)


def host_planes(pool: HostPool, dkv: DeviceKV) -> torch.Tensor:
    """Strided view `[num_slots, num_planes, chunk_elems]` of every slot's payload, in the
    movement dtype: `[s, p]` is plane p of the page blob in slot s (blocks back to back)."""
    g = dkv.geometry
    if pool.payload_bytes != g.page_bytes:
        raise ValueError(f"host slots hold {pool.payload_bytes} bytes, pages are {g.page_bytes}")
    payload = pool.payloads().view(move_dtype(g.itemsize))
    return payload.unflatten(1, (dkv.num_planes, dkv.blocks_per_page * dkv.block_elems))


def _moving(plane: torch.Tensor) -> torch.Tensor:
    return plane.view(move_dtype(plane.element_size()))


def store_cpu(dkv: DeviceKV, host: torch.Tensor, blocks: torch.Tensor, slots: torch.Tensor) -> None:
    """Copy the pages made of `blocks` into host slots `slots` (CPU tensors everywhere).

    The gather and scatter go through numpy views of the same memory: numpy's row indexing is a
    memcpy per row, while torch's CPU index_select / index_copy_ on 2-byte integer rows ran
    about 30x slower than memcpy on the machines kvtier is tested on."""
    n_pages = int(slots.numel())
    chunk = host.shape[2]
    host_np = host.numpy()
    planes = [_moving(p).numpy() for p in dkv.planes]
    blocks_np, slots_np = blocks.numpy(), slots.numpy()
    if dkv.block_bytes >= _CPU_LOOP_MIN_ITEM:
        n = dkv.blocks_per_page
        for page_blocks, slot in zip(blocks_np.tolist(), slots_np.tolist()):
            row = host_np[slot].reshape(len(planes), n, dkv.block_elems)
            for p, plane in enumerate(planes):
                for j, b in enumerate(page_blocks):
                    row[p, j] = plane[b]
        return
    step = max(1, _CPU_STEP_BYTES // max(1, chunk * host.element_size()))
    for lo in range(0, n_pages, step):
        blk = blocks_np[lo : lo + step].reshape(-1)
        sl = slots_np[lo : lo + step]
        for p, plane in enumerate(planes):
            host_np[sl, p] = plane[blk].reshape(len(sl), chunk)


def load_cpu(
    dkv: DeviceKV,
    host: torch.Tensor,
    slots: torch.Tensor,
    blocks: torch.Tensor,
    planes: Sequence[int] | None = None,
) -> None:
    """Copy host slots `slots` into the engine blocks `blocks` (CPU tensors everywhere), only
    the given planes (default: every plane a load writes, see DeviceKV.write_planes)."""
    n_pages = int(slots.numel())
    chunk = host.shape[2]
    step = max(1, _CPU_STEP_BYTES // max(1, chunk * host.element_size()))
    todo = dkv.write_planes() if planes is None else list(planes)
    host_np = host.numpy()
    blocks_np, slots_np = blocks.numpy(), slots.numpy()
    dev = {p: _moving(dkv.planes[p]).numpy() for p in todo}
    if dkv.block_bytes >= _CPU_LOOP_MIN_ITEM:
        n = dkv.blocks_per_page
        for page_blocks, slot in zip(blocks_np.tolist(), slots_np.tolist()):
            row = host_np[slot].reshape(dkv.num_planes, n, dkv.block_elems)
            for p in todo:
                plane = dev[p]
                for j, b in enumerate(page_blocks):
                    plane[b] = row[p, j]
        return
    for lo in range(0, n_pages, step):
        blk = blocks_np[lo : lo + step].reshape(-1)
        sl = slots_np[lo : lo + step]
        for p in todo:
            dev[p][blk] = host_np[sl, p].reshape(len(blk), dkv.block_elems)


def store_staged(
    dkv: DeviceKV, host: torch.Tensor, blocks_dev: torch.Tensor, slots: Sequence[int]
) -> torch.Tensor:
    """GPU fallback store: gather on the device into one staging blob per page, then one DMA
    per page into its (contiguous) slot payload. Runs on the current stream; returns the
    staging tensor, which must stay alive until the stream has passed this point."""
    n_pages = len(slots)
    chunk = host.shape[2]
    flat = blocks_dev.reshape(-1)
    parts = [_moving(pl).index_select(0, flat).view(n_pages, chunk) for pl in dkv.planes]
    staging = torch.stack(parts, dim=1)  # [N, P, chunk], device
    for i, s in enumerate(slots):
        host[s].copy_(staging[i], non_blocking=True)
    return staging


def load_staged(
    dkv: DeviceKV,
    host: torch.Tensor,
    slots: Sequence[int],
    blocks_dev: torch.Tensor,
    planes: Sequence[int] | None = None,
) -> torch.Tensor:
    """GPU fallback load: one DMA per page from its slot into a device staging blob, then a
    scatter per plane. Runs on the current stream; returns the staging tensor (keep it alive)."""
    n_pages = len(slots)
    staging = torch.empty((n_pages, *host.shape[1:]), dtype=host.dtype, device=blocks_dev.device)
    for i, s in enumerate(slots):
        staging[i].copy_(host[s], non_blocking=True)
    flat = blocks_dev.reshape(-1)
    todo = dkv.write_planes() if planes is None else list(planes)
    for p in todo:
        data = staging[:, p].reshape(flat.numel(), dkv.block_elems)
        _moving(dkv.planes[p]).index_copy_(0, flat, data)
    return staging
