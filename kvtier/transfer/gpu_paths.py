"""The three GPU paths of the copy engine, each enqueuing one job's copies on the current stream.

* `triton`: one kernel launch over every (page, plane, block) item; device threads load and store
  mapped pinned host memory directly (see triton_kernels), on a grid of at most
  `thresholds.triton_ctas_per_sm` programs per SM so that a store and a load co-run.
* `dma`: one batched driver copy (cuMemcpyBatchAsync) over every item; adjacent items merge.
* `torch`: gather to a device staging blob, one DMA per page (the fallback).

All three produce the same bytes as the CPU path (kvtier.transfer.torch_path). Nothing here
synchronizes; callers order the current stream and keep the returned tensors alive until the
stream has passed the copies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvtier.memory.host_pool import HostPool
from kvtier.transfer.device_kv import DeviceKV
from kvtier.transfer.dma import BatchDMA, merge_runs
from kvtier.transfer.thresholds import Thresholds
from kvtier.transfer.torch_path import load_staged, move_dtype, store_staged

PATHS = ("triton", "dma", "torch")


def _triton_module() -> Any:
    try:
        from kvtier.transfer import triton_kernels
    except ImportError:
        return None
    return triton_kernels


def base_view(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D `dtype` tensor starting at the first byte of t's storage (a kernel base pointer)."""
    storage = t.untyped_storage()
    size = dtype.itemsize
    return torch.empty(0, dtype=dtype, device=t.device).set_(
        storage, 0, (storage.nbytes() // size,), (1,)
    )


class GPUPaths:
    """Precomputed addressing of one (DeviceKV, HostPool) pair for the GPU paths."""

    def __init__(self, dkv: DeviceKV, pool: HostPool, thresholds: Thresholds) -> None:
        self.dkv = dkv
        self.pool = pool
        self.thresholds = thresholds
        self.device = dkv.device
        # the persistent copy grid is sized in programs per SM (2 stands in for the interpreter)
        self.num_sms = (
            torch.cuda.get_device_properties(dkv.device).multi_processor_count
            if dkv.device.type == "cuda"
            else 2
        )
        self.triton = _triton_module() if dkv.device.type == "cuda" else None
        dma = BatchDMA.get() if dkv.device.type == "cuda" else None
        self.dma = dma if dma is not None and dma.available else None
        g = dkv.geometry
        item = dkv.block_bytes
        # Byte quantities every kernel offset is a multiple of: they fix the movement dtype and
        # the alignment hint (16 bytes gives vector accesses).
        dev_base = min(dkv.plane_addrs())
        owner = next(p for p in dkv.planes if p.data_ptr() == dev_base)
        self._dev_base_addr = owner.untyped_storage().data_ptr()
        quantities = [item, pool.slot_bytes, pool.payload_offset, pool.tensor.data_ptr()]
        quantities += [a - self._dev_base_addr for a in dkv.plane_addrs()]
        quantities += [s * g.itemsize for s in dkv.row_strides()]
        align = math.gcd(16, *quantities)
        self.elem_size = min(align, 4) if align >= g.itemsize else g.itemsize
        self.align_elems = max(1, align // self.elem_size)
        es = self.elem_size
        elem = move_dtype(es)
        self._dev_base = base_view(owner, elem)
        self._host_base = base_view(pool.tensor, elem)
        off = [(a - self._dev_base_addr) // es for a in dkv.plane_addrs()]
        stride = [s * g.itemsize // es for s in dkv.row_strides()]
        self._plane_off = torch.tensor(off, dtype=torch.int64, device=self.device)
        self._plane_stride = torch.tensor(stride, dtype=torch.int64, device=self.device)
        self._plane_ids: dict[tuple[int, ...], torch.Tensor] = {}
        # numpy addressing for the DMA path
        self._np_plane_addr = np.array(dkv.plane_addrs(), dtype=np.int64)
        self._np_row_bytes = np.array(dkv.row_strides(), dtype=np.int64) * g.itemsize
        self._host_addr = pool.tensor.data_ptr() + pool.payload_offset

    # -- choice ------------------------------------------------------------------------------
    def choose(self, op: str, n_pages: int) -> str:
        """Path for `op` ("store"/"load") of n_pages pages under the measured thresholds."""
        items = n_pages * self.dkv.num_planes * self.dkv.blocks_per_page
        prefer_dma = self.triton is None or self.thresholds.use_dma(op, self.dkv.block_bytes, items)
        if self.dma is not None and self.dma.batched and prefer_dma:
            return "dma"
        if self.triton is not None:
            return "triton"
        return "dma" if self.dma is not None else "torch"

    def available(self, path: str) -> bool:
        return {"triton": self.triton is not None, "dma": self.dma is not None}.get(path, True)

    # -- running ----------------------------------------------------------------------------
    def run(
        self,
        op: str,
        path: str,
        blocks: torch.Tensor,
        slots: torch.Tensor,
        planes: Sequence[int],
        host: torch.Tensor,
    ) -> list[object]:
        """Enqueue `op` of pages (blocks [N, n] int64 CPU, slots [N] int64 CPU) for `planes` on
        the current stream. Returns objects to keep alive until the stream passes this point."""
        if path == "triton":
            return self._run_triton(op, blocks, slots, planes)
        if path == "dma":
            self._run_dma(op, blocks, slots, planes)
            return []
        blocks_dev = blocks.to(self.device, non_blocking=True)
        slot_list = slots.tolist()
        if op == "store":
            return [store_staged(self.dkv, host, blocks_dev, slot_list), blocks_dev]
        return [load_staged(self.dkv, host, slot_list, blocks_dev, planes), blocks_dev]

    def _plane_tensor(self, planes: Sequence[int]) -> torch.Tensor:
        key = tuple(planes)
        t = self._plane_ids.get(key)
        if t is None:
            t = torch.tensor(key, dtype=torch.int64, device=self.device)
            self._plane_ids[key] = t
        return t

    def _run_triton(
        self, op: str, blocks: torch.Tensor, slots: torch.Tensor, planes: Sequence[int]
    ) -> list[object]:
        if not planes or slots.numel() == 0:
            return []
        es = self.elem_size
        slot_off = (slots * self.pool.slot_bytes + self.pool.payload_offset) // es
        index = torch.cat([blocks.reshape(-1), slot_off]).to(self.device, non_blocking=True)
        blocks_dev, slot_dev = index[: blocks.numel()], index[blocks.numel() :]
        cap = self.thresholds.triton_ctas_per_sm
        self.copy_kernel(op == "store", blocks_dev, slot_dev, planes, self._host_base, cap)
        return [index]

    def copy_kernel(
        self,
        to_base: bool,
        blocks_dev: torch.Tensor,
        page_off_dev: torch.Tensor,
        planes: Sequence[int],
        base: torch.Tensor,
        ctas_per_sm: int = 0,
    ) -> None:
        """Enqueue the Triton copy of pages (device block ids `blocks_dev` [pages * n]) for
        `planes` between the engine's planes and `base` (pinned host pool or a device staging
        buffer), page i at element offset page_off_dev[i] of `base` in `elem_size` units, plane
        p of it at + p * plane_elems. `to_base`: planes -> base (else base -> planes).
        `ctas_per_sm` bounds the grid (0: one program per tile)."""
        dkv, es = self.dkv, self.elem_size
        n = dkv.blocks_per_page
        item = dkv.block_bytes // es
        block = min(self.thresholds.triton_block_bytes // es, 1 << (item - 1).bit_length())
        chunks = -(-item // block)
        n_tiles = int(page_off_dev.numel()) * len(planes) * n * chunks
        if n_tiles == 0:
            return
        cap = ctas_per_sm * self.num_sms
        grid = (min(n_tiles, cap) if cap > 0 else n_tiles,)
        host_base = (
            base if base.dtype == self._host_base.dtype else base.view(self._host_base.dtype)
        )
        assert self.triton is not None
        self.triton.copy_items_kernel[grid](
            self._dev_base,
            host_base,
            self._plane_off,
            self._plane_stride,
            self._plane_tensor(planes),
            blocks_dev,
            page_off_dev,
            len(planes),
            n_tiles,
            N_SUB=n,
            ITEM=item,
            BLOCK=block,
            ALIGN=self.align_elems,
            TO_HOST=to_base,
            num_warps=self.thresholds.triton_num_warps,
        )

    def item_addresses(
        self, blocks: torch.Tensor, slots: torch.Tensor, planes: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(device, host) byte addresses of every item, in page, plane, block order."""
        dkv = self.dkv
        n = dkv.blocks_per_page
        b = blocks.numpy().astype(np.int64).reshape(-1, 1, n)
        s = slots.numpy().astype(np.int64).reshape(-1, 1, 1)
        p = np.asarray(planes, dtype=np.int64).reshape(1, -1, 1)
        dev = self._np_plane_addr[p] + b * self._np_row_bytes[p]
        j = np.arange(n, dtype=np.int64).reshape(1, 1, n)
        host = self._host_addr + s * self.pool.slot_bytes + (p * n + j) * dkv.block_bytes
        return dev.reshape(-1), host.reshape(-1)

    def _run_dma(
        self, op: str, blocks: torch.Tensor, slots: torch.Tensor, planes: Sequence[int]
    ) -> None:
        if not planes or slots.numel() == 0:
            return
        assert self.dma is not None
        dev, host = self.item_addresses(blocks, slots, planes)
        dst, src = (host, dev) if op == "store" else (dev, host)
        dsts, srcs, sizes = merge_runs(dst, src, self.dkv.block_bytes)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        self.dma.copy(dsts, srcs, sizes, stream)
