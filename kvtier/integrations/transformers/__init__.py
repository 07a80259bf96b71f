"""Hugging Face Transformers integration: a Cache for `model.generate` that reuses prefixes."""

from kvtier.integrations.transformers.cache import KVTierCache, geometry_for, namespace_for

__all__ = ["KVTierCache", "geometry_for", "namespace_for"]
