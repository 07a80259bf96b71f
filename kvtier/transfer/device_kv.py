"""The engine's KV tensors as the copy engine sees them: one *plane* per (layer, K/V).

Whatever an engine allocates (vLLM per-layer `[2, blocks, block_size, H, D]` tensors, its
cross-layer block tensor, SGLang per-layer K and V token buffers, MLA latent buffers), kvtier
reduces it to `num_layers * kv_factor` planes. Plane `p = layer * kv_factor + kv` is a 2-D view
`[num_blocks, block_elems]` whose rows are engine blocks: `block_size` tokens of `[H][D]`
elements, contiguous (stride 1 inside a row), rows `row_stride` elements apart. That is exactly the
unit the canonical page blob is built from: page `i` made of blocks `b_0 .. b_{n-1}` holds, for
every plane `p` in order, rows `b_0 .. b_{n-1}` of plane `p` back to back (`[L][kv][S][H][D]`).

No data is copied here; every adapter returns views that share memory with the engine's tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvtier.errors import ConfigError
from kvtier.geometry.spec import KVGeometry


def _check_row_contiguous(t: torch.Tensor, what: str) -> None:
    """`t` is [num_blocks, block_size, H, D] (or other inner dims): each block must be dense."""
    inner = t.shape[1:]
    step = 1
    for size, stride in zip(reversed(inner), reversed(t.stride()[1:])):
        if size != 1 and stride != step:
            raise ConfigError(
                what,
                f"shape {tuple(t.shape)} strides {t.stride()}",
                "blocks whose [block_size, heads, head_size] elements are contiguous "
                "(NHD order); a head-major (HND) cache needs a layout conversion first",
            )
        step *= size


@dataclass(frozen=True)
class DeviceKV:
    """Engine KV memory: `planes[p]` is a `[num_blocks, block_elems]` view of plane p.

    `page_size % block_size == 0`; a kvtier page is `blocks_per_page` consecutive rows of its
    block table, in the order the caller lists them. `alias_of[p]` is the first plane that shares
    p's memory (p itself when none): layers that share one tensor under a hybrid allocator are
    read for every layer on store but written only once, through their first plane, on load.
    """

    geometry: KVGeometry
    block_size: int
    planes: tuple[torch.Tensor, ...]
    alias_of: tuple[int, ...]

    def __post_init__(self) -> None:
        g = self.geometry
        if self.block_size <= 0 or g.page_size % self.block_size:
            raise ConfigError(
                "block_size", self.block_size, f"a divisor of page_size {g.page_size}"
            )
        want = g.num_layers * g.kv_factor
        if len(self.planes) != want:
            raise ConfigError("num_layers", len(self.planes) // g.kv_factor, str(g.num_layers))
        devices = {p.device for p in self.planes}
        if len(devices) != 1:
            raise ConfigError("kv_tensors", sorted(map(str, devices)), "tensors on one device")
        for p in self.planes:
            if p.dim() != 2 or p.shape[1] != self.block_elems or p.stride(1) != 1:
                raise ConfigError("kv_tensors", tuple(p.shape), f"[blocks, {self.block_elems}]")
            if p.element_size() != g.itemsize:
                raise ConfigError("dtype", p.dtype, f"a {g.itemsize}-byte dtype like {g.dtype}")

    # -- sizes -----------------------------------------------------------------------------
    @property
    def block_elems(self) -> int:
        g = self.geometry
        return self.block_size * g.num_kv_heads * g.head_size

    @property
    def block_bytes(self) -> int:
        """Bytes of one contiguous run: one block of one plane (the copy engine's item)."""
        return self.block_elems * self.geometry.itemsize

    @property
    def blocks_per_page(self) -> int:
        return self.geometry.page_size // self.block_size

    @property
    def num_planes(self) -> int:
        return len(self.planes)

    @property
    def num_blocks(self) -> int:
        return min(int(p.shape[0]) for p in self.planes)

    @property
    def device(self) -> torch.device:
        return self.planes[0].device

    def plane_addrs(self) -> list[int]:
        return [p.data_ptr() for p in self.planes]

    def row_strides(self) -> list[int]:
        """Element stride between consecutive blocks, per plane."""
        return [p.stride(0) for p in self.planes]

    def write_planes(self, layers: range | None = None) -> list[int]:
        """Planes a load writes (first plane of each alias group), optionally for some layers."""
        kv = self.geometry.kv_factor
        lo, hi = (0, self.num_planes) if layers is None else (layers.start * kv, layers.stop * kv)
        return [p for p in range(lo, hi) if self.alias_of[p] == p]

    # -- adapters --------------------------------------------------------------------------
    @classmethod
    def from_planes(
        cls, planes: Sequence[torch.Tensor], geometry: KVGeometry, block_size: int
    ) -> DeviceKV:
        """Build from per-plane `[num_blocks, block_size, H, D]`-like views (rows dense)."""
        flat: list[torch.Tensor] = []
        for t in planes:
            _check_row_contiguous(t, "kv_tensors")
            flat.append(t.as_strided((t.shape[0], math.prod(t.shape[1:])), (t.stride(0), 1)))
        key = [(p.data_ptr(), p.stride(0), p.shape[0]) for p in flat]
        alias = tuple(key.index(k) for k in key)
        return cls(geometry, block_size, tuple(flat), alias)

    @classmethod
    def from_vllm(
        cls, layer_tensors: Sequence[torch.Tensor], geometry: KVGeometry, block_size: int
    ) -> DeviceKV:
        """vLLM per-layer caches: `[2, num_blocks, block_size, H, D]`, the
        `[num_blocks, 2, block_size, H, D]` order of some backends (told apart by shape), or MLA
        `[num_blocks, block_size, D]`. Any strides whose blocks are dense `[block_size, H, D]`
        work (e.g. a kv-first view of block-major memory). Several layers may pass the same
        tensor (hybrid allocator); they become aliased planes."""
        g = geometry
        if len(layer_tensors) != g.num_layers:
            raise ConfigError("num_layers", len(layer_tensors), f"{g.num_layers} layer tensors")
        planes: list[torch.Tensor] = []
        for t in layer_tensors:
            if g.mla:
                if t.dim() == 4 and t.shape[2] == 1:
                    t = t.squeeze(2)
                if t.dim() != 3 or tuple(t.shape[1:]) != (block_size, g.head_size):
                    raise ConfigError(
                        "kv_tensors", tuple(t.shape), f"[blocks, {block_size}, {g.head_size}]"
                    )
                planes.append(t.unsqueeze(2))
                continue
            inner = (block_size, g.num_kv_heads, g.head_size)
            if t.dim() != 5 or tuple(t.shape[2:]) != inner:
                raise ConfigError("kv_tensors", tuple(t.shape), f"[2, blocks, *{inner}]")
            # The shape says which axis is K/V (the strides only say where it lives); with
            # exactly two blocks the shape cannot tell, and vLLM's default kv-first is taken.
            kv_first = t.shape[0] == 2
            if not kv_first and t.shape[1] != 2:
                raise ConfigError("kv_tensors", tuple(t.shape), f"[2, blocks, *{inner}]")
            planes.extend((t[0], t[1]) if kv_first else (t[:, 0], t[:, 1]))
        return cls.from_planes(planes, g, block_size)

    @classmethod
    def from_cross_layer(
        cls, tensor: torch.Tensor, geometry: KVGeometry, block_size: int
    ) -> DeviceKV:
        """One tensor `[num_blocks, L, 2, block_size, H, D]` (MLA: `[num_blocks, L, bs, D]`)."""
        g = geometry
        if g.mla and tensor.dim() == 4:
            tensor = tensor.unsqueeze(2).unsqueeze(4)
        want = (g.num_layers, g.kv_factor, block_size, g.num_kv_heads, g.head_size)
        if tensor.dim() != 6 or tuple(tensor.shape[1:]) != want:
            raise ConfigError("kv_tensor", tuple(tensor.shape), f"[blocks, *{want}]")
        planes = [tensor[:, layer, k] for layer in range(g.num_layers) for k in range(g.kv_factor)]
        return cls.from_planes(planes, g, block_size)

    @classmethod
    def _from_token_buffers(
        cls, buffers: Sequence[torch.Tensor], geometry: KVGeometry, heads: int
    ) -> list[torch.Tensor]:
        g = geometry
        out = []
        for t in buffers:
            if t.dim() == 2:
                t = t.unsqueeze(1)
            if t.dim() != 3 or tuple(t.shape[1:]) != (heads, g.head_size):
                raise ConfigError("kv_buffers", tuple(t.shape), f"[tokens, {heads}, {g.head_size}]")
            pages = t.shape[0] // g.page_size
            out.append(t[: pages * g.page_size].unflatten(0, (pages, g.page_size)))
        return out

    @classmethod
    def from_sglang(
        cls,
        k_buffers: Sequence[torch.Tensor],
        v_buffers: Sequence[torch.Tensor],
        geometry: KVGeometry,
    ) -> DeviceKV:
        """SGLang MHA pool: per layer K and V `[tokens, H, D]`; block id = token index // page
        size (the engine block is the kvtier page). A trailing partial page is ignored."""
        g = geometry
        if g.mla or len(k_buffers) != g.num_layers or len(v_buffers) != g.num_layers:
            raise ConfigError(
                "kv_buffers", (len(k_buffers), len(v_buffers)), f"{g.num_layers} K and V buffers"
            )
        ks = cls._from_token_buffers(k_buffers, g, g.num_kv_heads)
        vs = cls._from_token_buffers(v_buffers, g, g.num_kv_heads)
        planes = [x for pair in zip(ks, vs) for x in pair]
        return cls.from_planes(planes, g, g.page_size)

    @classmethod
    def from_mla_buffers(cls, buffers: Sequence[torch.Tensor], geometry: KVGeometry) -> DeviceKV:
        """SGLang MLA pool: per layer `[tokens, 1, D]` latent buffers; block = kvtier page."""
        g = geometry
        if not g.mla or len(buffers) != g.num_layers:
            raise ConfigError("kv_buffers", len(buffers), f"{g.num_layers} MLA latent buffers")
        return cls.from_planes(cls._from_token_buffers(buffers, g, 1), g, g.page_size)
