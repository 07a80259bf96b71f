"""Moving prefix KV between kvtier host slots and Hugging Face layer tensors.

A host slot's payload is one page in the canonical `[L][kv][S][H][D]` order; a Transformers
cache layer holds `keys`/`values` as `[batch=1][H][T][D]`. Loading is per layer, so a model can
start computing layer 0 while later layers are still in flight.

One code path on every device: per layer, one strided 2-D copy per run of pages whose slots are
consecutive (rows of `g.layer_page_bytes`, source pitch = the slot size) straight into the
page-ordered staging buffer, then one permute copy into the layer's K and V. On CUDA the 2-D copy
is `cudaMemcpy2DAsync` from the pinned pool on a side stream, with one event per layer that the
compute stream waits on (`wait(layer)`) just before attention reads it; on the CPU it is a row-by-
row `memmove` with the same pointers, so CPU tests check the CUDA path's address arithmetic.
Every device tensor the side stream uses is allocated on the side stream and kept alive until
`synchronize()`: a tensor freed early returns to its stream's allocator pool and may be handed to
the compute stream while queued copies still read it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence

import torch

from kvtier.geometry import KVGeometry
from kvtier.memory.host_pool import HostPool

# copy(dst, dpitch, src, spitch, width, height, stream): cudaMemcpy2DAsync's argument order
Copy2D = Callable[[int, int, int, int, int, int, int], None]


def _dtype(g: KVGeometry) -> torch.dtype:
    return getattr(torch, g.dtype)


def host_copy2d(dst: int, dpitch: int, src: int, spitch: int, w: int, h: int, _s: int) -> None:
    """`cudaMemcpy2D` semantics between host addresses (the CPU device's copy)."""
    for row in range(h):
        ctypes.memmove(dst + row * dpitch, src + row * spitch, w)


def cuda_memcpy2d() -> Copy2D | None:
    """cudaMemcpy2DAsync (host to device) from cuda-bindings or cupy; None without either."""
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


def page_runs(slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """Cut pages (in page order) into runs whose slots are consecutive.

    Returns runs `(first_slot, count, first_page)`: pages first_page .. first_page+count-1 live
    in slots first_slot .. first_slot+count-1. A freshly stored prefix is usually one run.
    """
    runs: list[tuple[int, int, int]] = []
    for page, slot in enumerate(slots):
        if runs and runs[-1][0] + runs[-1][1] == slot and runs[-1][2] + runs[-1][1] == page:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, runs[-1][2])
        else:
            runs.append((slot, 1, page))
    return runs


def copy_plan(slots: Sequence[int]) -> tuple[list[tuple[int, int, int]], list[int] | None]:
    """The 2-D copies that bring `slots` (page order) into a staging buffer.

    Returns (runs, order): run = (first_slot, count, first_row) copies `count` consecutive slots
    to staging rows first_row...; `order[j]` is the staging row of page j, or None when the
    rows are already in page order. Page-order runs are used unless sorting the slots first
    cuts the number of copies at least fourfold (a pool whose free list handed out slots out of
    order); then one gather puts the rows back in page order.
    """
    direct = page_runs(slots)
    ranked = sorted(range(len(slots)), key=lambda j: slots[j])
    by_slot = page_runs([slots[j] for j in ranked])
    if len(by_slot) * 4 > len(direct):
        return direct, None
    order = [0] * len(slots)
    for row, j in enumerate(ranked):
        order[j] = row
    return by_slot, order


class LayerLoader:
    """Loads the pages in `slots` (page order) into per-layer K/V tensors on `device`.

    `start()` queues every layer; `wait(l)` makes the current stream wait for layer l and returns
    its (K, V), each `[1][H][n * S][D]`, once (the loader drops its reference). The slots must
    stay leased (prepare_load) until `synchronize()` returns; on the CPU everything happens in
    `start()`. `copy2d` replaces the device's 2-D copy (tests); raises ValueError for a slot
    outside the pool.
    """

    def __init__(
        self,
        pool: HostPool,
        g: KVGeometry,
        slots: Sequence[int],
        device: torch.device,
        copy2d: Copy2D | None = None,
    ) -> None:
        self.pool, self.g, self.slots = pool, g, list(slots)
        if any(not 0 <= s < pool.num_slots for s in self.slots):
            raise ValueError(f"slot outside the host pool (0..{pool.num_slots - 1})")
        self.device = device
        self.n = len(self.slots)
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * g.num_layers
        self.runs, self.order = copy_plan(self.slots)
        self._copy2d = copy2d
        self._events: list[torch.cuda.Event] = []
        self._stream: torch.cuda.Stream | None = None
        self._done_event: torch.cuda.Event | None = None
        self._keep: list[torch.Tensor] = []  # side-stream buffers, alive until synchronize()

    def _to_hf(self, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[n][kv][S][H][D] (page order) -> K, V as [1][H][n*S][D] contiguous, always a copy
        (the staging buffer is reused for a later layer)."""
        g = self.g
        out = torch.empty(
            (2, g.num_kv_heads, self.n * g.page_size, g.head_size),
            dtype=pages.dtype,
            device=pages.device,
        )
        out.view(2, g.num_kv_heads, self.n, g.page_size, g.head_size).copy_(
            pages.permute(1, 3, 0, 2, 4)
        )
        return out[0:1], out[1:2]

    def start(self) -> None:
        if self.n == 0:
            return
        if self.device.type == "cuda":
            copy = self._copy2d or cuda_memcpy2d()
            if copy is not None and self.pool.pinned:
                self._start_cuda(copy)
                return
            self._load_torch()  # no 2-D DMA or pageable pool: plain (blocking) copies
            return
        self._load_host(self._copy2d or host_copy2d)

    def _queue_layer(self, copy: Copy2D, buf: torch.Tensor, layer: int, stream: int) -> None:
        """The 2-D copies of one layer's rows from every run of slots into `buf` (page order)."""
        lpb, pitch = self.g.layer_page_bytes, self.pool.slot_bytes
        base = self.pool.tensor.data_ptr() + self.pool.payload_offset + layer * lpb
        dst = buf.data_ptr()
        for first_slot, count, first_page in self.runs:
            copy(dst + first_page * lpb, lpb, base + first_slot * pitch, pitch, lpb, count, stream)

    def _pages(self, buf: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
        """The staging rows as pages `[n][kv][S][H][D]` in page order."""
        g = self.g
        pages = buf.view(_dtype(g)).view(self.n, 2, g.page_size, g.num_kv_heads, g.head_size)
        return pages if order is None else pages.index_select(0, order)

    def _order(self) -> torch.Tensor | None:
        """The gather index on this device, made on the current stream (the side stream in
        `_start_cuda`, so the copy is ordered before the gathers that read it)."""
        if self.order is None:
            return None
        idx = torch.tensor(self.order, dtype=torch.int64)
        if self.device.type != "cuda":
            return idx.to(self.device)
        return idx.pin_memory().to(self.device, non_blocking=True)

    def _load_host(self, copy: Copy2D) -> None:
        buf = torch.empty(self.n, self.g.layer_page_bytes, dtype=torch.uint8)
        order = None if self.order is None else torch.tensor(self.order, dtype=torch.int64)
        for layer in range(self.g.num_layers):
            self._queue_layer(copy, buf, layer, 0)
            self.layers[layer] = self._to_hf(self._pages(buf, order).to(self.device))

    def _load_torch(self) -> None:
        lpb, off = self.g.layer_page_bytes, self.pool.payload_offset
        buf = torch.empty(self.n, lpb, dtype=torch.uint8, device=self.device)
        order = self._order()
        for layer in range(self.g.num_layers):
            rows = self.pool.tensor[:, off + layer * lpb : off + (layer + 1) * lpb]
            for first_slot, count, first_page in self.runs:
                buf[first_page : first_page + count].copy_(rows[first_slot : first_slot + count])
            self.layers[layer] = self._to_hf(self._pages(buf, order))

    def _start_cuda(self, copy: Copy2D) -> None:
        g = self.g
        stream = torch.cuda.Stream(device=self.device)
        self._stream = stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            # two staging buffers: layer l+1's DMA overlaps layer l's permute copy
            ring = [
                torch.empty(self.n, g.layer_page_bytes, dtype=torch.uint8, device=self.device)
                for _ in (0, 1)
            ]
            order = self._order()
            self._keep = ring if order is None else [*ring, order]
            for layer in range(g.num_layers):
                buf = ring[layer % 2]
                self._queue_layer(copy, buf, layer, stream.cuda_stream)
                k, v = self._to_hf(self._pages(buf, order))
                ev = torch.cuda.Event()
                ev.record(stream)
                self._events.append(ev)
                self.layers[layer] = (k, v)
            self._done_event = torch.cuda.Event()
            self._done_event.record(stream)

    def wait(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.layers[layer]
        if kv is None:
            raise RuntimeError(f"layer {layer} was not started or was already taken")
        if self._events:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(self._events[layer])
            # tensors made on the side stream are now used (and freed) on this one
            kv[0].record_stream(cur)
            kv[1].record_stream(cur)
        self.layers[layer] = None
        return kv

    def finished(self) -> bool:
        """True once every host read is done (the slots may then be released)."""
        return self._done_event is None or self._done_event.query()

    def synchronize(self) -> None:
        """Wait for every queued copy; the staging buffers are freed after that."""
        if self._done_event is not None:
            self._done_event.synchronize()
        self._keep = []


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
