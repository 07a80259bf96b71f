"""Policy names -> classes, and the one factory the cache and the CLI use."""

from __future__ import annotations

from collections.abc import Hashable

from kvtier.errors import ConfigError
from kvtier.policy.arc import ARCPolicy
from kvtier.policy.base import EvictionPolicy
from kvtier.policy.lru import LRUPolicy
from kvtier.policy.s3fifo import S3FIFOPolicy

POLICIES: dict[str, type[EvictionPolicy[Hashable]]] = {
    LRUPolicy.name: LRUPolicy,
    ARCPolicy.name: ARCPolicy,
    S3FIFOPolicy.name: S3FIFOPolicy,
}


def make_policy(name: str, capacity: int) -> EvictionPolicy[Hashable]:
    """A fresh policy ``name`` ("lru", "arc", "s3fifo") sized for ``capacity`` pages.

    Raises ConfigError naming the field for an unknown name or a capacity that is not a
    positive integer.
    """
    cls = POLICIES.get(name)
    if cls is None:
        raise ConfigError("policy", name, list(POLICIES))
    return cls(capacity)
