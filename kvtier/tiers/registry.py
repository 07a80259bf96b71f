"""Pick secondary tiers by name (`kind` in the config).

Each tier module registers a factory taking (name, options, ctx) and returning a SecondaryTier;
factories validate their own options and raise ConfigError naming `tiers.<name>.<field>`.
Modules are imported lazily so a server client (redis, mooncake, nixl) is only imported when a
config names that tier.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from kvtier.errors import ConfigError
from kvtier.tiers.base import SecondaryTier, TierContext

TierFactory = Callable[[str, Mapping[str, Any], TierContext], SecondaryTier]

# kind -> module that registers it on import
TIER_MODULES: dict[str, str] = {
    "disk": "kvtier.tiers.disk",
    "redis": "kvtier.tiers.redis",
    "valkey": "kvtier.tiers.redis",
    "mooncake": "kvtier.tiers.mooncake",
    "nixl": "kvtier.tiers.nixl",
}
_FACTORIES: dict[str, TierFactory] = {}


def register_tier(kind: str) -> Callable[[TierFactory], TierFactory]:
    def deco(factory: TierFactory) -> TierFactory:
        _FACTORIES[kind] = factory
        return factory

    return deco


def make_tier(kind: str, name: str, options: Mapping[str, Any], ctx: TierContext) -> SecondaryTier:
    if kind not in _FACTORIES:
        if kind not in TIER_MODULES:
            raise ConfigError(f"tiers.{name}.kind", kind, sorted(TIER_MODULES))
        importlib.import_module(TIER_MODULES[kind])
    if kind not in _FACTORIES:
        raise ConfigError(f"tiers.{name}.kind", kind, "a tier available in this installation")
    return _FACTORIES[kind](name, options, ctx)
