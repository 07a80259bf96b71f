"""The tiered cache: lookup / prepare_load / prepare_store / complete_* / events / stats."""

from kvtier.cache.config import CacheConfig, default_config, parse_config
from kvtier.cache.tiered import TieredCache
from kvtier.cache.types import (
    CacheEvent,
    CacheStats,
    EventKind,
    LoadPlan,
    Lookup,
    LookupStatus,
    StorePlan,
    TierCounters,
)

__all__ = [
    "CacheConfig",
    "CacheEvent",
    "CacheStats",
    "EventKind",
    "LoadPlan",
    "Lookup",
    "LookupStatus",
    "StorePlan",
    "TierCounters",
    "TieredCache",
    "default_config",
    "parse_config",
]
