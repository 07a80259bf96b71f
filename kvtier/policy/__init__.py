"""Eviction strategies over keys: pure bookkeeping, no I/O, atomic evict(n), O(1) operations."""

from kvtier.policy.arc import ARCPolicy
from kvtier.policy.base import EvictionPolicy
from kvtier.policy.lru import LRUPolicy
from kvtier.policy.registry import POLICIES, make_policy
from kvtier.policy.replay import ReplayResult, replay
from kvtier.policy.s3fifo import S3FIFOPolicy

__all__ = [
    "ARCPolicy",
    "EvictionPolicy",
    "LRUPolicy",
    "POLICIES",
    "ReplayResult",
    "S3FIFOPolicy",
    "make_policy",
    "replay",
]
