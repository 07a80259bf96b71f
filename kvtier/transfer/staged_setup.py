"""Building an engine's staged path (kvtier.transfer.staged) from its GPU paths: the Triton
gather/scatter kernel and the driver's copies where they exist, torch indexing and tensor
copies otherwise."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kvtier.memory.host_pool import HostPool
from kvtier.transfer.device_kv import DeviceKV
from kvtier.transfer.gpu_paths import GPUPaths
from kvtier.transfer.staged import Copier, Kernel, StagedPath
from kvtier.transfer.thresholds import Staged


def make_staged(dkv: DeviceKV, pool: HostPool, cfg: Staged, gpu: GPUPaths | None) -> StagedPath:
    """The staged path of an engine: Triton gather/scatter and driver copies where they exist
    (`gpu`), torch indexing and tensor copies otherwise (CPU tensors)."""
    if gpu is None:
        return StagedPath(dkv, pool, cfg.chunk_bytes, cfg.buffers)
    paths = gpu
    kernel: Kernel | None = None
    if paths.triton is not None:

        def kernel(
            to_staging: bool,
            blocks: torch.Tensor,
            off: torch.Tensor,
            planes: Sequence[int],
            base: torch.Tensor,
        ) -> None:
            paths.copy_kernel(to_staging, blocks, off, planes, base)

    copier: Copier | None = None
    dma = paths.dma
    if dma is not None:
        loop = not (cfg.batch and dma.batched)

        def copier(d: np.ndarray, s: np.ndarray, n: np.ndarray, stream: int) -> None:
            assert dma is not None
            dma.copy(d, s, n, stream, loop=loop)

    return StagedPath(dkv, pool, cfg.chunk_bytes, cfg.buffers, kernel, copier, paths.elem_size)
