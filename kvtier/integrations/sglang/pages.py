"""SGLang host-pool pages <-> kvtier's canonical page payload.

SGLang's host pools (MHATokenToKVPoolHost, MLATokenToKVPoolHost) keep one `kv_buffer` whose
axis order depends on `layout`:

    MHA layer_first        (2, L, tokens, H, D)
    MHA page_first         (2, tokens, L, H, D)        token-major inside the K and V halves
    MHA page_first_direct  (2, pages, L, S, H, D)
    MHA page_head          (2, pages, H, S, L, D)
    MLA layer_first        (L, tokens, 1, D)
    MLA page_first         (tokens, L, 1, D)
    MLA page_first_direct  (pages, L, S, 1, D)

A page below the host is always kvtier's canonical `[L][kv][S][H][D]` blob payload (kv = 1 for
the MLA latent), so pages written by any layout read back into any other, and every tier stores
opaque blobs. `page_view` names the axes of one page as it sits in the pool; the copy functions
permute through it, which is one strided copy per page (no Python loop over tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvtier.errors import ConfigError
from kvtier.geometry import KVGeometry
from kvtier.geometry.spec import canonical_dtype

CANON = ("L", "kv", "S", "H", "D")
MHA_LAYOUTS = ("layer_first", "page_first", "page_first_direct", "page_head")
MLA_LAYOUTS = ("layer_first", "page_first", "page_first_direct")


@dataclass(frozen=True)
class PoolShape:
    """What kvtier needs to know about one SGLang host pool."""

    geometry: KVGeometry
    layout: str
    mla: bool


def pool_shape(host: Any, *, mla: bool) -> PoolShape:
    """Read geometry and layout from an SGLang host pool; ConfigError for what kvtier can't map."""
    layout = str(host.layout)
    allowed = MLA_LAYOUTS if mla else MHA_LAYOUTS
    if layout not in allowed:
        raise ConfigError("hicache_mem_layout", layout, allowed)
    if int(getattr(host, "dcp_size", 1)) != 1:
        raise ConfigError("dcp_size", host.dcp_size, "1 (decode context parallel is not mapped)")
    if mla:
        heads, width = 1, int(host.kv_cache_dim)
    else:
        heads, width = int(host.head_num), int(host.head_dim)
        v_dim = int(getattr(host, "v_head_dim", width))
        if v_dim != width:
            raise ConfigError("v_head_dim", v_dim, f"equal to head_dim ({width})")
    geometry = KVGeometry(
        num_layers=int(host.layer_num),
        num_kv_heads=heads,
        head_size=width,
        page_size=int(host.page_size),
        dtype=canonical_dtype(host.dtype),
        mla=mla,
    )
    return PoolShape(geometry, layout, mla)


def page_view(kv_buffer: torch.Tensor, shape: PoolShape, index: int) -> torch.Tensor:
    """One page of the pool as a view in canonical axis order `[L][kv][S][H][D]`.

    `index` is the page's first token index in the pool (SGLang's `host_indices[i * S]`).
    Writing through the returned view writes the pool.
    """
    s = shape.geometry.page_size
    if index % s:
        raise ValueError(f"host index {index} is not page aligned (page size {s})")
    p = index // s
    if shape.mla:
        if shape.layout == "layer_first":  # (L, S, 1, D)
            page = kv_buffer[:, index : index + s]
        elif shape.layout == "page_first":  # (S, L, 1, D)
            page = kv_buffer[index : index + s].transpose(0, 1)
        else:  # page_first_direct: (L, S, 1, D)
            page = kv_buffer[p]
        return page.unsqueeze(1)
    if shape.layout == "layer_first":  # (2, L, S, H, D)
        return kv_buffer[:, :, index : index + s].transpose(0, 1)
    if shape.layout == "page_first":  # (2, S, L, H, D)
        return kv_buffer[:, index : index + s].permute(2, 0, 1, 3, 4)
    if shape.layout == "page_first_direct":  # (2, L, S, H, D)
        return kv_buffer[:, p].transpose(0, 1)
    return kv_buffer[:, p].permute(3, 0, 2, 1, 4)  # page_head: (2, H, S, L, D)


def native_flat_shape(shape: PoolShape) -> tuple[tuple[int, ...], Callable[[torch.Tensor], Any]]:
    """Shape of a "flat data page" as SGLang's get_data_page(flat=True) lays it out, and the
    permutation taking that shape to canonical order (for the non-zero-copy get/set calls)."""
    g = shape.geometry
    L, S, H, D = g.num_layers, g.page_size, g.num_kv_heads, g.head_size
    if shape.mla:
        if shape.layout == "page_first":
            return (S, L, 1, D), lambda t: t.transpose(0, 1).unsqueeze(1)
        return (L, S, 1, D), lambda t: t.unsqueeze(1)
    if shape.layout == "page_first":
        return (2, S, L, H, D), lambda t: t.permute(2, 0, 1, 3, 4)
    if shape.layout == "page_head":
        return (2, H, S, L, D), lambda t: t.permute(3, 0, 2, 1, 4)
    return (2, L, S, H, D), lambda t: t.transpose(0, 1)


def payload_view(row: torch.Tensor, shape: PoolShape, offset: int) -> torch.Tensor:
    """The canonical payload inside a uint8 blob row (header first) as `[L][kv][S][H][D]`."""
    g = shape.geometry
    dtype = getattr(torch, g.dtype)
    return (
        row[offset : offset + g.page_bytes]
        .view(dtype)
        .view(g.num_layers, g.kv_factor, g.page_size, g.num_kv_heads, g.head_size)
    )
