"""Torch views of an ElasticPool's reserved range, in the shapes an engine expects.

Layer-first pools (`ElasticLayout.layer_first`) give `[L][kv][num_blocks][page_size][H][D]`,
one region per (layer, K/V) in that order, so each layer is one contiguous
`[kv][num_blocks][page_size][H][D]` tensor and all layers together one cross-layer tensor.
Page-first pools give `[num_blocks][L][kv][page_size][H][D]`. The views do not own memory: keep
the pool open while they are used. Needs a backend with a `tensor()` method (CudaVmmBackend).
"""

from __future__ import annotations

from typing import Any

from kvtier.errors import ConfigError
from kvtier.geometry import KVGeometry, torch_dtype
from kvtier.memory.elastic import ElasticPool


def _check(pool: ElasticPool, geometry: KVGeometry) -> None:
    lay = pool.layout
    layer_first = (lay.regions == geometry.num_layers * geometry.kv_factor
                   and lay.chunk_bytes == geometry.chunk_bytes)
    page_first = lay.regions == 1 and lay.chunk_bytes == geometry.page_bytes
    if not (layer_first or page_first):
        raise ConfigError("geometry", geometry.as_dict(), "the geometry the pool was laid out for")
    if not hasattr(pool.backend, "tensor"):
        raise ConfigError("backend", type(pool.backend).__name__, "a backend with tensor views")


def cross_layer_tensor(pool: ElasticPool, geometry: KVGeometry) -> Any:
    """One tensor over the whole range (layer-first or page-first, as the pool is laid out)."""
    _check(pool, geometry)
    g, nb = geometry, pool.layout.num_blocks
    if pool.layout.regions == 1 and g.num_layers * g.kv_factor != 1:
        shape = (nb, g.num_layers, g.kv_factor, g.page_size, g.num_kv_heads, g.head_size)
    else:
        shape = (g.num_layers, g.kv_factor, nb, g.page_size, g.num_kv_heads, g.head_size)
    return pool.backend.tensor(pool.base, shape, torch_dtype(g.dtype), pool.local)  # type: ignore[attr-defined]


def layer_tensors(pool: ElasticPool, geometry: KVGeometry) -> list[Any]:
    """Per-layer `[kv][num_blocks][page_size][H][D]` tensors of a layer-first pool."""
    _check(pool, geometry)
    if pool.layout.regions != geometry.num_layers * geometry.kv_factor:
        raise ConfigError("layout", "page_first", "a layer-first pool for per-layer tensors")
    return list(cross_layer_tensor(pool, geometry).unbind(0))
