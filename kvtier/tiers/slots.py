"""Fixed-slot tiers: pages in `capacity` equal slots of storage, indexed in memory.

The disk tier (slab files, POSIX I/O) and the nixl tier (slab files or objects, NIXL I/O) keep
pages the same way and differ only in how bytes move, so the index lives here and a subclass
supplies `_io` (and, where its storage can say more, `_read_headers`, `_exists`, `_lost`).

Index and restart: the index (key -> slot, eviction policy, free slots) lives in memory. A
slot's first 64 bytes are the blob header, which names the page key; a new tier on the same
storage reads every slot header and rebuilds the index from them, so every page stored before is
served again. A removed or corrupt page's header is overwritten with zeros (a tombstone) before
its slot is reused, so it does not come back. A torn write (crash) leaves a header whose checksum
does not match: a counted miss on load, then removed - never wrong KV. An evicted page's slot is
reused at once without a tombstone: if a crash lands before the overwrite, the old page comes
back, which is harmless (a page key names its content).

Readers (`reader=True`): a second process may serve the same storage read-only (SGLang's MLA TP
ranks share one namespace, and only one of them writes). A reader takes no lock, never writes or
tombstones, and rebuilds its index from the headers when a lookup misses and its last scan is
older than `rescan_s`, so it sees the writer's pages within about that long.

Free slots are handed out lowest first, so a batch stored together lands in adjacent slots and
is read back as one sequential run when it is loaded together.
"""

from __future__ import annotations

import heapq
import logging
import os
import struct
import threading
import time
from abc import abstractmethod
from collections import Counter
from collections.abc import Sequence
from typing import cast

from kvtier.keys import HEADER_SIZE, PageKey
from kvtier.keys.blob import FLAG_SEALED, MAGIC, VERSION
from kvtier.policy import EvictionPolicy, make_policy
from kvtier.tiers.base import Item, ThreadedTier, TierContext, TierStats
from kvtier.tiers.options import drop_corrupt

log = logging.getLogger("kvtier.tiers.slots")

# the header fields a restart needs (layout documented in kvtier.keys.blob)
HEAD = struct.Struct("<4sHH16s16sQ")
SCAN_BATCH = 4096  # slot headers read per request at start-up

Pair = tuple[memoryview, int]  # (host bytes, slot): the bytes sit at the start of the slot


class SlotIOError(Exception):
    """A request moving bytes to or from slots failed (the whole request)."""


class SlotTier(ThreadedTier):
    """Pages in `capacity` fixed slots, evicted by `policy` when every slot is taken.

    Thread-safe: the index (policy, key->slot, free slots, pins) lives under one lock that is
    never held across I/O. A slot is reused only after its page left the index: evicted pages
    are never pinned by a load, and removed pages' slots come back only after their tombstone
    is written. Subclasses set up their storage, then call `_start()` to scan it.
    """

    def __init__(self, name: str, ctx: TierContext, capacity: int, *, policy: str,
                 threads: int, max_inflight: int, lock_fd: int | None = None,
                 reader: bool = False, rescan_s: float = 1.0) -> None:
        super().__init__(name, ctx, threads=threads, max_inflight=max_inflight)
        self.capacity = capacity
        self.reader = reader
        self._rescan_s = rescan_s
        self._last_scan = 0.0
        self._policy_name = policy
        self._lock_fd = lock_fd
        self._policy = cast("EvictionPolicy[PageKey]", make_policy(policy, capacity))
        self._index_lock = threading.Lock()
        self._slot: dict[PageKey, int] = {}
        self._free: list[int] = []  # a min-heap: lowest slot first
        self._busy: set[int] = set()  # slots being written or tombstoned now
        self._pins: Counter[PageKey] = Counter()
        self._zero = bytearray(HEADER_SIZE)  # tombstone source
        self.scanned = 0

    # -- storage, supplied by subclasses ------------------------------------------------------
    @abstractmethod
    def _io(self, op: str, pairs: Sequence[Pair]) -> None:
        """Write ("WRITE") or read ("READ") each buffer at the start of its slot, all or
        nothing. Raises SlotIOError when any part fails (the caller retries slot by slot)."""

    def _read_headers(self, slots: Sequence[int]) -> bytearray:
        """The first HEADER_SIZE bytes of each slot, packed in the order given."""
        heads = bytearray(len(slots) * HEADER_SIZE)
        view = memoryview(heads)
        for i in range(0, len(slots), SCAN_BATCH):
            chunk = slots[i : i + SCAN_BATCH]
            self._io("READ", [(view[(i + j) * HEADER_SIZE : (i + j + 1) * HEADER_SIZE], s)
                              for j, s in enumerate(chunk)])
        return heads

    def _exists(self, slots: Sequence[int]) -> list[bool]:
        """Which slots hold anything at all (files: every slot; they read as zeros)."""
        return [True] * len(slots)

    def _lost(self, slots: Sequence[int]) -> list[bool]:
        """After a read of each of `slots` alone failed: which hold no readable page for good."""
        return [True] * len(slots)

    def _close_storage(self) -> None:
        """Release the storage (files, agents); called once by close()."""

    def _refresh(self) -> None:
        """Readers: pick up storage the writer created since the last scan (subclasses)."""

    # -- start-up -------------------------------------------------------------------------------
    def _scan(self) -> tuple[dict[PageKey, int], list[int], list[int]]:
        """(key -> slot, stale slots, free slots) from every slot header."""
        n = self.capacity
        exists = self._exists(range(n))
        live = [s for s in range(n) if exists[s]]
        heads = self._read_headers(live)
        found: dict[PageKey, int] = {}
        stale: list[int] = []
        free = [s for s in range(n) if not exists[s]]
        fp, payload = self.ctx.fingerprint, self.ctx.payload_bytes
        for j, s in enumerate(live):
            magic, version, flags, f, key, length = HEAD.unpack_from(heads, j * HEADER_SIZE)
            ok = (magic == MAGIC and version == VERSION and flags & FLAG_SEALED and f == fp
                  and length == payload)
            if ok and key not in found:
                found[key] = s
            elif magic != b"\0\0\0\0":
                stale.append(s)  # a duplicate or foreign header: zero it before reuse
            else:
                free.append(s)
        return found, stale, free

    def _start(self) -> None:
        """Rebuild the index from the slot headers."""
        found, stale, free = self._scan()
        self._slot = found
        for key in found:
            self._policy.insert(key)
        self._free = free + (stale if self.reader else [])
        heapq.heapify(self._free)
        if stale and not self.reader:
            self._busy.update(stale)
            self._tombstone(stale)
        if self._slot:
            log.info("tier %s: found %d pages", self.name, len(self._slot))
        self.scanned = len(self._slot)
        self._last_scan = time.monotonic()

    def _rescan(self) -> None:
        """Readers: replace the index with what the slot headers say now (the writer process
        stores and evicts behind this one's back; a page it overwrote since fails its checksum
        or key check on load: a counted miss, never wrong KV)."""
        self._refresh()
        found, stale, free = self._scan()
        with self._index_lock:
            policy = cast("EvictionPolicy[PageKey]", make_policy(self._policy_name,
                                                                  self.capacity))
            for key in found:
                policy.insert(key)
                if key in self._pins:
                    policy.pin(key)
            self._policy, self._slot = policy, found
            self._free = free + stale
            heapq.heapify(self._free)
            self._last_scan = time.monotonic()

    # -- blocking primitives -----------------------------------------------------------------
    def _contains_batch(self, keys: Sequence[PageKey]) -> list[bool]:
        with self._index_lock:
            out = [k in self._slot for k in keys]
        if self.reader and not all(out) and time.monotonic() - self._last_scan >= self._rescan_s:
            self._rescan()
            with self._index_lock:
                out = [k in self._slot for k in keys]
        return out

    def _store_batch(self, items: Sequence[Item]) -> list[bool]:
        if self.reader:  # another process owns the slots
            return [False] * len(items)
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
                    heapq.heappush(self._free, self._slot.pop(key))
            for i in fresh[: len(self._free)]:  # the rest fail: every slot holds a pinned page
                slot = heapq.heappop(self._free)
                self._busy.add(slot)
                todo.append((i, slot))
        self._note_removed(victims)
        written = False
        try:
            if todo:
                self._io("WRITE", [(items[i][1], s) for i, s in todo])
                written = True
        except SlotIOError as exc:
            self._fault("write", exc)
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
                        heapq.heappush(self._free, slot)
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
            except SlotIOError as exc:
                self._fault("read", exc)
                bad: list[tuple[int, int]] = []
                for i, s in want:  # one bad slot must not fail its neighbours
                    try:
                        if len(want) > 1:
                            self._io("READ", [(items[i][1], s)])
                            flags[i] = True
                        else:
                            bad.append((i, s))
                    except SlotIOError:
                        bad.append((i, s))
                lost = self._lost([s for _, s in bad])
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
                    if self.reader:  # forget it here; the writer owns the slot
                        heapq.heappush(self._free, slot)
                    else:
                        self._busy.add(slot)
                        slots.append(slot)
        self._tombstone(slots)

    def _tombstone(self, slots: Sequence[int]) -> None:
        """Zero the headers of `slots` (marked busy by the caller) so a restart does not bring
        their pages back, then free them. A slot whose tombstone failed is freed anyway: a store
        overwrites it."""
        try:
            if slots:
                z = memoryview(self._zero)
                self._io("WRITE", [(z, s) for s in slots])
        finally:
            with self._index_lock:
                for s in slots:
                    self._busy.discard(s)
                    heapq.heappush(self._free, s)

    # -- reporting ------------------------------------------------------------------------------
    def stats(self) -> TierStats:
        with self._index_lock:
            pages = len(self._slot)
        return self._stats(pages, pages * self.ctx.blob_bytes,
                           self.capacity * self.ctx.blob_bytes)

    @property
    def used_bytes(self) -> int:
        with self._index_lock:
            return len(self._slot) * self.ctx.blob_bytes

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
            # a reader's storage changes under it (the writer): only its own index is checked
            if self.reader or self.inflight() or self._busy or self._pins \
                    or self.capacity > 65536:
                return
            order = list(self._slot.items())
        heads = self._read_headers([s for _, s in order])
        for i, (key, slot) in enumerate(order):
            head = HEAD.unpack_from(heads, i * HEADER_SIZE)
            assert head[4] == key, f"slot {slot} holds {head[4].hex()}, index says {key.hex()}"

    def close(self) -> None:
        super().close()
        self._close_storage()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the directory lock
            self._lock_fd = None
