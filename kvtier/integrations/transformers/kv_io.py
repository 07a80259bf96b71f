"""Moving prefix KV between kvtier host slots and Hugging Face layer tensors.

A host slot's payload is one page in the canonical `[L][kv][S][H][D]` order; a Transformers
cache layer holds `keys`/`values` as `[batch=1][H][T][D]`. Loading is per layer, so a model can
start computing layer 0 while later layers are still in flight:

* CPU: a gather of the layer's bytes from every page's slot, then a permute copy.
* CUDA: one strided DMA (`cudaMemcpy2DAsync`) per run of consecutive slots per layer, from the
  pinned host pool into a device staging buffer (rows of `g.layer_page_bytes`, pitch = the slot
  size), then one device gather+permute into the layer's K and V; all on a side stream, with one
  event per layer that the compute stream waits on (`wait(layer)`) just before attention reads it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtier.geometry import KVGeometry
from kvtier.memory.host_pool import HostPool


def _dtype(g: KVGeometry) -> torch.dtype:
    return getattr(torch, g.dtype)


def _memcpy2d():
    """cudaMemcpy2DAsync from cuda-bindings (or cupy), or None when neither is installed."""
    try:
        from cuda.bindings import runtime as rt

        def copy(dst: int, dpitch: int, src: int, spitch: int, w: int, h: int, s: int) -> None:
            (err,) = rt.cudaMemcpy2DAsync(
                dst, dpitch, src, spitch, w, h, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, s
            )
            if int(err) != 0:
                raise RuntimeError(f"cudaMemcpy2DAsync failed: {err}")

        return copy
    except ImportError:
        pass
    try:
        import cupy

        def copy_cp(dst: int, dpitch: int, src: int, spitch: int, w: int, h: int, s: int) -> None:
            cupy.cuda.runtime.memcpy2DAsync(dst, dpitch, src, spitch, w, h, 1, s)

        return copy_cp
    except ImportError:
        return None


def slot_runs(slots: Sequence[int]) -> tuple[list[tuple[int, int, int]], list[int]]:
    """Sort pages by slot and cut them into runs of consecutive slots.

    Returns (runs, position): run = (first_slot, count, first_position); `position[j]` is where
    page j lands in slot-sorted order.
    """
    order = sorted(range(len(slots)), key=lambda j: slots[j])
    position = [0] * len(slots)
    for pos, j in enumerate(order):
        position[j] = pos
    runs: list[tuple[int, int, int]] = []
    for pos, j in enumerate(order):
        s = slots[j]
        if runs and runs[-1][0] + runs[-1][1] == s:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, runs[-1][2])
        else:
            runs.append((s, 1, pos))
    return runs, position


class LayerLoader:
    """Loads the pages in `slots` (page order) into per-layer K/V tensors on `device`.

    `start()` queues every layer; `wait(l)` makes the current stream wait for layer l and returns
    its (K, V), each `[1][H][n * S][D]`. The slots must stay leased (prepare_load) until
    `finished()` is True (after the last wait); on CPU, everything happens in start().
    """

    def __init__(
        self, pool: HostPool, g: KVGeometry, slots: Sequence[int], device: torch.device
    ) -> None:
        self.pool, self.g, self.slots = pool, g, list(slots)
        self.device = device
        self.n = len(self.slots)
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * g.num_layers
        self._events: list[torch.cuda.Event] = []
        self._stream: torch.cuda.Stream | None = None
        self._done_event: torch.cuda.Event | None = None

    def _to_hf(self, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[n][kv][S][H][D] (page order) -> K, V as [1][H][n*S][D] contiguous."""
        g = self.g
        kv = pages.permute(1, 3, 0, 2, 4).reshape(2, g.num_kv_heads, self.n * g.page_size, -1)
        return kv[0].unsqueeze(0).contiguous(), kv[1].unsqueeze(0).contiguous()

    def start(self) -> None:
        if self.n == 0:
            return
        if self.device.type == "cuda":
            copy = _memcpy2d()
            if copy is not None and self.pool.pinned:
                self._start_cuda(copy)
                return
        self._load_sync()

    def _load_sync(self) -> None:
        g, lpb = self.g, self.g.layer_page_bytes
        idx = torch.tensor(self.slots, dtype=torch.int64)
        pays = self.pool.payloads()
        for layer in range(g.num_layers):
            raw = pays[:, layer * lpb : (layer + 1) * lpb].index_select(0, idx)
            pages = raw.view(_dtype(g)).view(self.n, 2, g.page_size, g.num_kv_heads, g.head_size)
            k, v = self._to_hf(pages.to(self.device, non_blocking=False))
            self.layers[layer] = (k, v)

    def _start_cuda(self, copy) -> None:
        g, lpb = self.g, self.g.layer_page_bytes
        runs, position = slot_runs(self.slots)
        stream = torch.cuda.Stream(device=self.device)
        self._stream = stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        perm = torch.tensor(position, dtype=torch.int64, device=self.device)
        base = self.pool.tensor.data_ptr() + self.pool.payload_offset
        pitch = self.pool.slot_bytes
        with torch.cuda.stream(stream):
            ring = [torch.empty(self.n, lpb, dtype=torch.uint8, device=self.device) for _ in (0, 1)]
            for layer in range(g.num_layers):
                buf = ring[layer % 2]
                for first, count, pos in runs:
                    copy(
                        buf.data_ptr() + pos * lpb,
                        lpb,
                        base + first * pitch + layer * lpb,
                        pitch,
                        lpb,
                        count,
                        stream.cuda_stream,
                    )
                pages = buf.view(_dtype(g)).view(self.n, 2, g.page_size, g.num_kv_heads, -1)
                k, v = self._to_hf(pages.index_select(0, perm))
                ev = torch.cuda.Event()
                ev.record(stream)
                self._events.append(ev)
                self.layers[layer] = (k, v)
            self._done_event = torch.cuda.Event()
            self._done_event.record(stream)

    def wait(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.layers[layer]
        assert kv is not None, "start() was not called"
        if self._events:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(self._events[layer])
            # tensors made on the side stream are now used on this one
            kv[0].record_stream(cur)
            kv[1].record_stream(cur)
        self.layers[layer] = None
        return kv

    def finished(self) -> bool:
        """True once every host read is done (the slots may then be released)."""
        return self._done_event is None or self._done_event.query()

    def synchronize(self) -> None:
        if self._done_event is not None:
            self._done_event.synchronize()


def pages_from_hf(
    keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], g: KVGeometry, first: int, n: int
) -> torch.Tensor:
    """Tokens [first*S, (first+n)*S) of per-layer K/V `[1][H][T][D]` (T counted from the start of
    the given tensors) as canonical pages: uint8 `[n][page_bytes]` on the tensors' device."""
    s = g.page_size
    lo, hi = first * s, (first + n) * s
    per_layer = [
        torch.stack((k[0, :, lo:hi], v[0, :, lo:hi]))  # [kv][H][n*S][D]
        for k, v in zip(keys, values)
    ]
    x = torch.stack(per_layer)  # [L][kv][H][n*S][D]
    x = x.view(g.num_layers, 2, g.num_kv_heads, n, s, g.head_size)
    x = x.permute(3, 0, 1, 4, 2, 5).contiguous()  # [n][L][kv][S][H][D]
    return x.view(n, -1).view(torch.uint8)


def write_slots(pool: HostPool, slots: Sequence[int], pages: torch.Tensor) -> None:
    """Copy uint8 `[n][page_bytes]` pages into the payloads of `slots` (host pool)."""
    if not slots:
        return
    pays = pool.payloads()
    host = pages.to("cpu")
    for j, s in enumerate(slots):
        pays[s].copy_(host[j])
