"""KV geometry and layouts (the lowest layer: imports nothing else from kvtier but errors)."""

from kvtier.geometry.spec import DTYPE_SIZES, PRESETS, KVGeometry, canonical_dtype, preset, torch_dtype

__all__ = ["DTYPE_SIZES", "PRESETS", "KVGeometry", "canonical_dtype", "preset", "torch_dtype"]
