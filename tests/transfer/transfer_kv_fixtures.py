"""Engine-shaped KV tensors for the copy-engine tests, each with an independent reader.

Every builder returns (DeviceKV, block(layer, kv, block_id) -> [block_size, H, D] view) where
the reader indexes the engine's own tensors the way the engine does, not through DeviceKV, so
the tests check the adapters as well as the copies.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvtier.geometry.spec import KVGeometry
from kvtier.transfer.device_kv import DeviceKV
from kvtier.transfer.torch_path import move_dtype

Reader = Callable[[int, int, int], torch.Tensor]
ADAPTERS = ("vllm", "vllm_blocks_first", "vllm_shared", "cross_layer", "sglang")
MLA_ADAPTERS = ("vllm_mla", "cross_layer_mla", "sglang_mla")


def rand(shape: tuple[int, ...], g: KVGeometry, gen: torch.Generator) -> torch.Tensor:
    """Random bits in the movement dtype of g (any bit pattern: NaNs included)."""
    n = 1
    for s in shape:
        n *= s
    raw = torch.randint(0, 256, (n * g.itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(move_dtype(g.itemsize)).view(shape)


def build(
    kind: str, g: KVGeometry, block_size: int, num_blocks: int, seed: int = 0
) -> tuple[DeviceKV, Reader, list[torch.Tensor]]:
    """(DeviceKV, reader, the distinct engine tensors) for adapter `kind`."""
    gen = torch.Generator().manual_seed(seed)
    H, D, L, bs = g.num_kv_heads, g.head_size, g.num_layers, block_size
    if kind == "vllm":
        ts = [rand((2, num_blocks, bs, H, D), g, gen) for _ in range(L)]
        return DeviceKV.from_vllm(ts, g, bs), lambda la, k, b: ts[la][k, b], ts
    if kind == "vllm_blocks_first":
        ts = [rand((num_blocks, 2, bs, H, D), g, gen) for _ in range(L)]
        return DeviceKV.from_vllm(ts, g, bs), lambda la, k, b: ts[la][b, k], ts
    if kind == "vllm_shared":  # hybrid allocator: layers 0,1 share, 2,3 share, ...
        uniq = [rand((2, num_blocks, bs, H, D), g, gen) for _ in range((L + 1) // 2)]
        ts = [uniq[i // 2] for i in range(L)]
        return DeviceKV.from_vllm(ts, g, bs), lambda la, k, b: ts[la][k, b], uniq
    if kind == "cross_layer":
        t = rand((num_blocks, L, 2, bs, H, D), g, gen)
        return DeviceKV.from_cross_layer(t, g, bs), lambda la, k, b: t[b, la, k], [t]
    if kind == "sglang":  # block = page; tokens not a multiple of the page (tail ignored)
        tokens = num_blocks * g.page_size + 3
        ks = [rand((tokens, H, D), g, gen) for _ in range(L)]
        vs = [rand((tokens, H, D), g, gen) for _ in range(L)]

        def read_sg(la: int, k: int, b: int) -> torch.Tensor:
            buf = (ks if k == 0 else vs)[la]
            return buf[b * g.page_size : (b + 1) * g.page_size]

        return DeviceKV.from_sglang(ks, vs, g), read_sg, ks + vs
    if kind == "vllm_mla":
        ts = [rand((num_blocks, bs, D), g, gen) for _ in range(L)]
        return DeviceKV.from_vllm(ts, g, bs), lambda la, k, b: ts[la][b].unsqueeze(1), ts
    if kind == "cross_layer_mla":
        t = rand((num_blocks, L, bs, D), g, gen)
        reader = lambda la, k, b: t[b, la].unsqueeze(1)  # noqa: E731
        return DeviceKV.from_cross_layer(t, g, bs), reader, [t]
    if kind == "sglang_mla":
        tokens = num_blocks * g.page_size
        bufs = [rand((tokens, 1, D), g, gen) for _ in range(L)]

        def read_mla(la: int, k: int, b: int) -> torch.Tensor:
            return bufs[la][b * g.page_size : (b + 1) * g.page_size]

        return DeviceKV.from_mla_buffers(bufs, g), read_mla, bufs
    raise ValueError(kind)


def expected_blob(g: KVGeometry, read: Reader, blocks: list[int]) -> torch.Tensor:
    """The canonical page blob ([L][kv][S][H][D], as bytes) of the page made of `blocks`."""
    parts = [
        torch.cat([read(la, k, b) for b in blocks]).reshape(-1)
        for la in range(g.num_layers)
        for k in range(g.kv_factor)
    ]
    return torch.cat(parts).view(torch.uint8)
