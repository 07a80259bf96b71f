"""NIXL tier: pages in fixed slots of slab files (POSIX backend) or of objects (OBJ backend).

Why slots, not one file per page: with a few preallocated (sparse) slab files the files are
opened and registered with NIXL once, and every batch is one NIXL request of (offset, length,
fd) descriptors - no create/rename/unlink and no registration per page. Objects use the same
scheme (slot s is object `slot-<s>`): a bounded set of objects, overwritten in place, so
eviction never needs a DELETE, which NIXL does not offer.

The index, restart scan and tombstones are kvtier.tiers.slots'; the slab directory (manifest,
lock) is kvtier.tiers.slabs'. This module only moves bytes through NIXL.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from kvtier.errors import ConfigError
from kvtier.keys import HEADER_SIZE
from kvtier.policy import POLICIES
from kvtier.tiers.base import TierContext
from kvtier.tiers.nixl_io import NixlIOError, SlotStore, buffer_address
from kvtier.tiers.nixl_setup import make_store
from kvtier.tiers.options import Options
from kvtier.tiers.registry import register_tier
from kvtier.tiers.slots import SCAN_BATCH, Pair, SlotTier


class NixlTier(SlotTier):
    """Pages in `store`'s slots; see SlotTier for the index contract."""

    kind = "nixl"

    def __init__(self, name: str, ctx: TierContext, store: SlotStore, *, policy: str = "lru",
                 threads: int = 2, max_inflight: int = 8, lock_fd: int | None = None) -> None:
        super().__init__(name, ctx, store.num_slots, policy=policy, threads=threads,
                         max_inflight=max_inflight, lock_fd=lock_fd)
        self.store = store
        # the tombstone source stays registered for the tier's life
        store.host.register(buffer_address(self._zero), len(self._zero))
        self._start()

    def register_host_buffer(self, ptr: int, nbytes: int) -> bool:
        """Register the host pool's buffer with NIXL once (optional; else found per batch)."""
        return self.store.host.register(ptr, nbytes)

    def register_host_memory(self, ptr: int, nbytes: int) -> None:
        self.register_host_buffer(ptr, nbytes)

    # -- storage --------------------------------------------------------------------------------
    def _io(self, op: str, pairs: Sequence[Pair]) -> None:
        local, temp = self.store.host.prepare([memoryview(b) for b, _ in pairs], True)
        try:
            remote = [(s, 0, n) for (_, n), (_, s) in zip(local, pairs)]
            self.store.transfer(op, local, remote)
        finally:
            self.store.host.release(temp)

    def _read_headers(self, slots: Sequence[int]) -> bytearray:
        """One registration for the whole header buffer, SCAN_BATCH headers per request."""
        heads = bytearray(max(len(slots), 1) * HEADER_SIZE)
        agent = self.store.agent
        reg = agent.register_memory([(buffer_address(heads), len(heads), 0, "")], "DRAM")
        try:
            base = buffer_address(heads)
            for i in range(0, len(slots), SCAN_BATCH):
                chunk = slots[i : i + SCAN_BATCH]
                self.store.transfer(
                    "READ", [(base + (i + j) * HEADER_SIZE, HEADER_SIZE)
                             for j in range(len(chunk))],
                    [(s, 0, HEADER_SIZE) for s in chunk])
        finally:
            agent.deregister_memory(reg)
        return heads

    def _exists(self, slots: Sequence[int]) -> list[bool]:
        return self.store.exists(slots)

    def _lost(self, slots: Sequence[int]) -> list[bool]:
        return self.store.lost(slots)

    def _close_storage(self) -> None:
        self.store.close()


@register_tier("nixl")
def make_nixl_tier(name: str, options: Mapping[str, Any], ctx: TierContext) -> NixlTier:
    """Options: backend (posix | obj), budget, policy, timeout, threads, max_inflight;
    posix: path, io (aio | uring | posix_aio | sync), slab_size;
    obj: bucket, endpoint, region, access_key, secret_key, prefix."""
    o = Options(name, options)
    budget = o.size("budget", "8GiB", minimum=ctx.blob_bytes)
    policy = o.choice("policy", "lru", sorted(POLICIES))
    timeout = o.seconds("timeout", 30.0) or 30.0
    threads = o.integer("threads", 2)
    max_inflight = o.integer("max_inflight", 8)
    backend = str(o.data.get("backend", "posix"))
    where = o.field("path" if backend == "posix" else "endpoint")
    store, lock_fd = make_store(name, o, ctx, budget, timeout)
    try:
        o.finish()
        return NixlTier(name, ctx, store, policy=policy, threads=threads,
                        max_inflight=max_inflight, lock_fd=lock_fd)
    except NixlIOError as exc:  # the start-up scan could not read the storage
        store.close()
        if lock_fd is not None:
            os.close(lock_fd)
        raise ConfigError(where, options.get("path", options.get("endpoint")),
                          f"storage NIXL can read ({exc})") from exc
    except BaseException:
        store.close()
        if lock_fd is not None:
            os.close(lock_fd)
        raise
