"""KV geometry and layouts (the lowest layer: imports nothing else from kvtier but errors)."""

from kvtier.geometry.groups import (
    AttentionGroup,
    AttentionKind,
    KVCacheSpec,
    KVTensorSpec,
    attention_kind,
    uniform_spec,
)
from kvtier.geometry.layout_ops import (
    convert,
    empty_pool,
    from_canonical,
    head_slice,
    sliced_geometry,
    to_canonical,
)
from kvtier.geometry.layouts import (
    CANONICAL_LAYOUT,
    Layout,
    dims,
    element_offset,
    page_runs,
    parse_layout,
    pool_elems,
    run_count,
    shape,
    strides,
)
from kvtier.geometry.spec import (
    DTYPE_SIZES,
    PRESETS,
    KVGeometry,
    canonical_dtype,
    preset,
    torch_dtype,
)

__all__ = ["DTYPE_SIZES", "PRESETS", "KVGeometry", "canonical_dtype", "preset", "torch_dtype"]

__all__ += [
    "AttentionGroup",
    "AttentionKind",
    "KVCacheSpec",
    "KVTensorSpec",
    "attention_kind",
    "uniform_spec",
]

__all__ += [
    "CANONICAL_LAYOUT",
    "Layout",
    "convert",
    "dims",
    "element_offset",
    "empty_pool",
    "from_canonical",
    "head_slice",
    "page_runs",
    "parse_layout",
    "pool_elems",
    "run_count",
    "shape",
    "sliced_geometry",
    "strides",
    "to_canonical",
]
