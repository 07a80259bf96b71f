"""kvtier's eviction policies (LRU, ARC, S3-FIFO) behind vLLM's own cache-policy hook.

vLLM's CPU offloading manager takes an out-of-tree policy by class name and module path:

    "kv_connector_extra_config": {"eviction_policy": "KVTierS3FIFO",
                                  "cache_policy_module_path": "kvtier.integrations.vllm.policy",
                                  ...}

vLLM keeps the chunk bookkeeping (reference counts, chunk ids); the kvtier policy decides who
leaves. A chunk is pinned in the kvtier policy whenever vLLM says it is not evictable (being
written, or read by a transfer).
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterable
from typing import ClassVar

from vllm.v1.kv_offload.base import OffloadKey, ReqContext
from vllm.v1.kv_offload.cpu.policies.base import CachePolicy, ChunkStatus

from kvtier.errors import EvictionError
from kvtier.policy import EvictionPolicy, make_policy


class KVTierCachePolicy(CachePolicy):
    """Adapter base: `policy_name` picks the kvtier policy. Scheduler thread only."""

    policy_name: ClassVar[str] = "lru"

    def __init__(self, cache_capacity: int) -> None:
        super().__init__(cache_capacity)
        self._chunks: dict[OffloadKey, ChunkStatus] = {}
        self._policy: EvictionPolicy[Hashable] = make_policy(
            self.policy_name, max(1, cache_capacity)
        )

    def get(self, key: OffloadKey) -> ChunkStatus | None:
        return self._chunks.get(key)

    def insert(self, key: OffloadKey, chunk: ChunkStatus) -> None:
        self._chunks[key] = chunk
        self._policy.insert(key)
        self._policy.pin(key)  # not readable yet: vLLM marks it evictable when the store lands

    def remove(self, key: OffloadKey) -> None:
        if self._chunks.pop(key, None) is not None:
            self._policy.remove(key)

    def touch(self, keys: Iterable[OffloadKey], req_context: ReqContext) -> None:
        for key in keys:
            if key in self._chunks:
                self._policy.access(key)

    def mark_evictable(self, key: OffloadKey) -> None:
        self._policy.unpin(key)

    def mark_non_evictable(self, key: OffloadKey) -> None:
        self._policy.pin(key)

    def evict(
        self, n: int, protected: Collection[OffloadKey]
    ) -> list[tuple[OffloadKey, ChunkStatus]] | None:
        """Exactly n unprotected evictable chunks, or None with nothing changed. Protected
        chunks are pinned for the call (an LRU policy then counts them as just used)."""
        if n <= 0:
            return []
        shielded = [
            k for k in protected
            if k in self._chunks and self._chunks[k].ref_cnt == 0
        ]  # fmt: skip
        for key in shielded:
            self._policy.pin(key)
        try:
            victims = self._policy.evict(n)
        except EvictionError:
            return None
        finally:
            for key in shielded:
                if key in self._chunks:
                    self._policy.unpin(key)
        return [(OffloadKey(key), self._chunks.pop(OffloadKey(key))) for key in victims]  # type: ignore[arg-type]

    def clear(self) -> None:
        self._chunks.clear()
        self._policy = make_policy(self.policy_name, max(1, self.cache_capacity))


class KVTierLRU(KVTierCachePolicy):
    policy_name = "lru"


class KVTierARC(KVTierCachePolicy):
    policy_name = "arc"


class KVTierS3FIFO(KVTierCachePolicy):
    policy_name = "s3fifo"
