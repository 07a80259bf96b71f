"""NIXL tier: pages in fixed slots of slab files (POSIX backend) or of objects (OBJ backend).

Why slots, not one file per page: with a few preallocated (sparse) slab files the files are
opened and registered with NIXL once, and every batch is one NIXL request of (offset, length,
fd) descriptors - no create/rename/unlink and no registration per page. Objects use the same
scheme (slot s is object `slot-<s>`): a bounded set of objects, overwritten in place, so
eviction never needs a DELETE, which NIXL does not offer.

Index and restart: the index (key -> slot, eviction policy) lives in memory. A slot's first 64
bytes are the blob header, which names the page key; a new tier on the same directory (or
bucket prefix) reads every slot header in batches and rebuilds the index from them, so every
page stored before is served again. A removed or corrupt page's header is overwritten with zeros
(a tombstone) before its slot is reused, so it does not come back. A torn write (crash) leaves a
header whose checksum does not match: a counted miss on load, then removed - never wrong KV.

Files: `<path>/<namespace hex>/slab-NNNN.kvt`, plus `manifest.json` (slot size and slots per
slab, so a restart with a different `slab_size` still finds the old layout) and a lock file that
keeps a second live tier off the same directory.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, cast

from kvtier.errors import ConfigError
from kvtier.keys import HEADER_SIZE, PageKey
from kvtier.keys.blob import FLAG_SEALED, MAGIC, VERSION
from kvtier.policy import POLICIES, EvictionPolicy, make_policy
from kvtier.tiers.base import Item, ThreadedTier, TierContext, TierStats
from kvtier.tiers.nixl_io import NixlIOError, SlotStore, buffer_address
from kvtier.tiers.nixl_setup import make_store
from kvtier.tiers.options import Options, drop_corrupt
from kvtier.tiers.registry import register_tier

log = logging.getLogger("kvtier.tiers.nixl")

# the header fields a restart needs (layout documented in kvtier.keys.blob)
_HEAD = struct.Struct("<4sHH16s16sQ")
_SCAN_BATCH = 4096  # slot headers read per NIXL request at start-up


class NixlTier(ThreadedTier):
    """Pages in `store`'s slots, evicted by `policy` when every slot is taken.

    Thread-safe: the index (policy, key->slot, free slots, pins) lives under one lock that is
    never held across NIXL I/O. A slot is reused only after its page left the index: evicted
    pages are never pinned by a load, and removed pages' slots come back only after their
    tombstone is written.
    """

    kind = "nixl"

    def __init__(self, name: str, ctx: TierContext, store: SlotStore, *, policy: str = "lru",
                 threads: int = 2, max_inflight: int = 8, lock_fd: int | None = None) -> None:
        super().__init__(name, ctx, threads=threads, max_inflight=max_inflight)
        self.store = store
        self.capacity = store.num_slots
        self._lock_fd = lock_fd
        self._policy = cast("EvictionPolicy[PageKey]", make_policy(policy, self.capacity))
        self._index_lock = threading.Lock()
        self._slot: dict[PageKey, int] = {}
        self._free: list[int] = []
        self._busy: set[int] = set()  # slots being written or tombstoned now
        self._pins: Counter[PageKey] = Counter()
        self._zero = bytearray(HEADER_SIZE)  # tombstone source, registered for the tier's life
        store.host.register(buffer_address(self._zero), len(self._zero))
        self.scanned = self._scan()

    def register_host_buffer(self, ptr: int, nbytes: int) -> bool:
        """Register the host pool's buffer with NIXL once (optional; else found per batch)."""
        return self.store.host.register(ptr, nbytes)

    def register_host_memory(self, ptr: int, nbytes: int) -> None:
        self.register_host_buffer(ptr, nbytes)

    # -- start-up -------------------------------------------------------------------------------
    def _scan(self) -> int:
        """Rebuild the index from the slot headers; return the number of pages found."""
        n = self.capacity
        heads = bytearray(n * HEADER_SIZE)
        exists = self.store.exists(range(n))
        live = [s for s in range(n) if exists[s]]
        reg = self.store.agent.register_memory(
            [(buffer_address(heads), len(heads), 0, "")], "DRAM")
        try:
            base = buffer_address(heads)
            for i in range(0, len(live), _SCAN_BATCH):
                chunk = live[i : i + _SCAN_BATCH]
                self.store.transfer("READ", [(base + s * HEADER_SIZE, HEADER_SIZE) for s in chunk],
                                    [(s, 0, HEADER_SIZE) for s in chunk])
        finally:
            self.store.agent.deregister_memory(reg)
        stale: list[int] = []
        for s in range(n):
            magic, version, flags, fp, key, length = _HEAD.unpack_from(heads, s * HEADER_SIZE)
            ok = (magic == MAGIC and version == VERSION and flags & FLAG_SEALED
                  and fp == self.ctx.fingerprint and length == self.ctx.payload_bytes)
            if not ok or key in self._slot:
                if magic != b"\0\0\0\0" and exists[s]:
                    stale.append(s)  # a duplicate or foreign header: zero it before reuse
                else:
                    self._free.append(s)
                continue
            self._slot[key] = s
            self._policy.insert(key)
        self._free.reverse()  # low slots first: files stay dense
        if stale:
            self._tombstone(stale)
        if self._slot:
            log.info("tier %s: found %d pages", self.name, len(self._slot))
        return len(self._slot)

    # -- blocking primitives -----------------------------------------------------------------
    def _contains_batch(self, keys: Sequence[PageKey]) -> list[bool]:
        with self._index_lock:
            return [k in self._slot for k in keys]

    def _store_batch(self, items: Sequence[Item]) -> list[bool]:
        flags = [False] * len(items)
        todo: list[tuple[int, int]] = []  # (item index, slot)
        with self._index_lock:
            fresh: list[int] = []
            seen: set[PageKey] = set()
            for i, (key, _) in enumerate(items):
                if key in self._slot:  # a page key names its content: nothing to rewrite
                    self._policy.access(key)
                    flags[i] = True
                elif key not in seen:  # the same key twice in a batch is written once
                    seen.add(key)
                    fresh.append(i)
            need = len(fresh) - len(self._free)
            victims: list[PageKey] = []
            if need > 0:
                victims = self._policy.evict(min(need, self._policy.evictable()))
                for key in victims:
                    self._free.append(self._slot.pop(key))
            for i in fresh[: len(self._free)]:  # the rest fail: every slot holds a pinned page
                slot = self._free.pop()
                self._busy.add(slot)
                todo.append((i, slot))
        self._note_removed(victims)
        written = False
        try:
            if todo:
                self._io("WRITE", [(items[i][1], s) for i, s in todo])
                written = True
        finally:
            with self._index_lock:
                for i, slot in todo:
                    self._busy.discard(slot)
                    key = items[i][0]
                    if written and key not in self._slot:
                        self._slot[key] = slot
                        self._policy.insert(key)
                        flags[i] = True
                    else:  # failed, or a concurrent job stored it first: the copy is spare
                        flags[i] = flags[i] or (written and key in self._slot)
                        self._free.append(slot)
        if written:
            self._recovered()
        return flags

    def _load_batch(self, items: Sequence[Item]) -> list[bool]:
        with self._index_lock:
            slots = [self._slot.get(key) for key, _ in items]
            for (key, _), slot in zip(items, slots):
                if slot is not None:  # pinned: eviction must not hand this slot to a store
                    self._pins[key] += 1
                    self._policy.pin(key)
                    self._policy.access(key)
        flags = [False] * len(items)
        want = [(i, s) for i, s in enumerate(slots) if s is not None]
        damaged: list[PageKey] = []
        try:
            try:
                self._io("READ", [(items[i][1], s) for i, s in want])
                for i, _ in want:
                    flags[i] = True
            except NixlIOError as exc:
                self._fault("read", exc)
                bad: list[tuple[int, int]] = []
                for i, s in want:  # one bad slot must not fail its neighbours
                    try:
                        if len(want) > 1:
                            self._io("READ", [(items[i][1], s)])
                            flags[i] = True
                        else:
                            bad.append((i, s))
                    except NixlIOError:
                        bad.append((i, s))
                lost = self.store.lost([s for _, s in bad])
                damaged = [items[i][0] for (i, _), gone in zip(bad, lost) if gone]
        finally:
            with self._index_lock:
                for (key, _), slot in zip(items, slots):
                    if slot is not None:
                        self._pins[key] -= 1
                        if self._pins[key] <= 0:
                            del self._pins[key]
                            if key in self._slot:
                                self._policy.unpin(key)
        # a slot that cannot be read alone (short slab, vanished object) holds no usable page
        drop_corrupt(self, damaged, "slot unreadable (truncated file or missing object)")
        return flags

    def _remove_batch(self, keys: Sequence[PageKey]) -> None:
        with self._index_lock:
            slots = []
            for key in keys:
                slot = self._slot.pop(key, None)
                if slot is not None:
                    self._policy.remove(key)
                    self._busy.add(slot)
                    slots.append(slot)
        self._tombstone(slots)

    def _tombstone(self, slots: Sequence[int]) -> None:
        """Zero the headers of `slots` (so a restart does not bring their pages back), then
        free them. A slot whose tombstone failed is freed anyway: a store overwrites it."""
        try:
            if slots:
                z = memoryview(self._zero)[:HEADER_SIZE]
                self._io("WRITE", [(z, s) for s in slots])
        finally:
            with self._index_lock:
                for s in slots:
                    self._busy.discard(s)
                    self._free.append(s)

    def _io(self, op: str, pairs: Sequence[tuple[memoryview | bytearray, int]],
            keep: bool = True) -> None:
        local, temp = self.store.host.prepare([memoryview(b) for b, _ in pairs], keep)
        try:
            remote = [(s, 0, n) for (_, n), (_, s) in zip(local, pairs)]
            self.store.transfer(op, local, remote)
        finally:
            self.store.host.release(temp)

    # -- reporting ------------------------------------------------------------------------------
    def stats(self) -> TierStats:
        with self._index_lock:
            pages = len(self._slot)
        return self._stats(pages, pages * self.ctx.blob_bytes,
                           self.capacity * self.ctx.blob_bytes)

    def check_integrity(self) -> None:
        """Index invariants always; when idle and small, also that every indexed slot's header
        in storage names its key (one batched header read)."""
        with self._index_lock:
            self._policy.check_integrity()
            assert set(self._policy.keys()) == set(self._slot), "policy and slot map disagree"
            used = list(self._slot.values())
            every = used + self._free + list(self._busy)
            assert len(every) == len(set(every)) == self.capacity, "slot lost or held twice"
            assert all(c > 0 for c in self._pins.values()), "non-positive pin count"
            if self.inflight() or self._busy or self._pins or self.capacity > 65536:
                return
            index = dict(self._slot)
        heads = bytearray(max(len(index), 1) * HEADER_SIZE)
        view = memoryview(heads)
        order = list(index.items())
        self._io("READ", [(view[i * HEADER_SIZE : (i + 1) * HEADER_SIZE], s)
                          for i, (_, s) in enumerate(order)], keep=False)
        for i, (key, slot) in enumerate(order):
            head = _HEAD.unpack_from(heads, i * HEADER_SIZE)
            assert head[4] == key, f"slot {slot} holds {head[4].hex()}, index says {key.hex()}"

    def close(self) -> None:
        super().close()
        self.store.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the directory lock
            self._lock_fd = None


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
