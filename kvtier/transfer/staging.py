"""The staging state of one direction (store or load) of the staged DMA path
(kvtier.transfer.staged): device buffers, the DMA stream, and the events that order the two
stages on each buffer. Made once per direction, on its first staged job, never per job."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from kvtier.transfer.torch_path import move_dtype


@dataclass
class Direction:
    """Per buffer b, `filled[b]` says its bytes are ready for the next stage and `free[b]` that
    the last stage has read it. `lock` serialises job groups of this direction; everything
    below is read and written only under it."""

    buffers: torch.Tensor  # [B, buffer_bytes] uint8
    stream: torch.cuda.Stream | None
    filled: list[torch.cuda.Event]
    free: list[torch.cuda.Event]
    lock: threading.Lock
    views: list[torch.Tensor]  # buffers[b], made once (a tensor index costs microseconds)
    kviews: list[torch.Tensor]  # the same in the kernel's element type
    addrs: np.ndarray  # [B] int64 address of each buffer
    # a job group's first copy waits on `begin` (recorded on main), main on a store's `end`;
    # reused under `lock`: a wait is bound to the record before it, not to later ones
    begin: torch.cuda.Event | None
    end: torch.cuda.Event | None
    next_buf: int = 0

    @classmethod
    def make(cls, device: torch.device, chunk_bytes: int, num_buffers: int, unit: int
             ) -> Direction:
        """`num_buffers` buffers of `chunk_bytes` (each 256-byte aligned) on `device`, with a
        stream and events where it is a GPU; `unit`: the kernel's element size in bytes."""
        on_gpu = device.type == "cuda"
        size = -(-chunk_bytes // 256) * 256
        # zeroed: the bytes between page images (Layout.gap) go out with a store's copies,
        # into the padding and headers of the slots it fills (unsealed until it is done)
        bufs = torch.zeros((num_buffers, size), dtype=torch.uint8, device=device)
        views = [bufs[b] for b in range(num_buffers)]

        def events(n: int) -> list[torch.cuda.Event]:
            return [torch.cuda.Event() for _ in range(n)] if on_gpu else []

        begin, end = (torch.cuda.Event(), torch.cuda.Event()) if on_gpu else (None, None)
        return cls(
            bufs,
            torch.cuda.Stream(device) if on_gpu else None,
            events(num_buffers),
            events(num_buffers),
            threading.Lock(),
            views,
            [v.view(move_dtype(unit)) for v in views],
            np.array([v.data_ptr() for v in views], dtype=np.int64),
            begin,
            end,
        )
