"""ElasticPool: engine KV blocks on demand-mapped physical pages, placed tier by tier.

The pool reserves the whole KV range once (see `elastic_layout` for how blocks map onto pages)
and backs it one *slot* at a time. Slot states:

    unbacked --grow--> reserve (mapped, no block used) --alloc--> used --free all--> reserve
    reserve --trim/shrink--> unbacked (pages released to the driver)

Allocation takes blocks from partly used slots first, then from the pre-mapped reserve (pure
bookkeeping: microseconds), and only then maps a new slot (the cold path: create + map + access
per page). New slots go to the local GPU first, then to each peer in the limits' shared list,
each under its own byte budget; every slot remembers its device, so trimming and budgets follow
the real placement. Unbacked ranges stay mapped to the backend's read-only zero page, so stray
reads see zeros. Every failure leaves the bookkeeping and the mappings as they were.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from kvtier.errors import CapacityError, KVTierError
from kvtier.memory.elastic_layout import ElasticLayout, LimitSource, PoolLimits, StaticLimits
from kvtier.memory.elastic_slots import SlotMap
from kvtier.memory.vmm_backend import DeviceBackend


class AllocationError(KVTierError):
    """A caller freed a block that is not allocated, or applied an impossible mapping op."""


class MapOp(NamedTuple):
    """One mapping decision, as sent to tensor-parallel followers. `va_offset` is the slot's
    offset inside each region; `tier` indexes the placement order (0 = the local GPU)."""

    op: str  # "map" | "unmap"
    va_offset: int
    tier: int


@dataclass(frozen=True)
class PoolStats:
    pages_per_device: dict[int, int]
    bytes_per_device: dict[int, int]
    slots_used: int
    slots_reserve: int
    slots_unbacked: int
    blocks_used: int
    blocks_total: int
    limit: int | None


class ElasticPool:
    """Demand-mapped KV blocks. Public methods are thread-safe (one lock).

    `readers` are the devices whose kernels access the KV (default: the local device).
    `reserve_slots` is K, the number of mapped free slots kept for fast allocation.
    """

    def __init__(
        self,
        backend: DeviceBackend,
        layout: ElasticLayout,
        local_device: int = 0,
        limits: LimitSource | PoolLimits | None = None,
        reserve_slots: int = 2,
        readers: Sequence[int] | None = None,
        zero_fill: bool = True,
        record_ops: bool = False,
    ) -> None:
        self.backend = backend
        self.layout = layout
        self.local = local_device
        self.readers = list(readers) if readers is not None else [local_device]
        self.reserve_target = reserve_slots
        self.zero_fill = zero_fill
        if limits is None or isinstance(limits, PoolLimits):
            limits = StaticLimits(limits)
        self._source = limits
        self._limits = limits.current()
        self._lock = threading.RLock()
        n = layout.num_slots
        self._slot_used = [0] * n
        self._partial: dict[int, list[int]] = {}
        self._reserve: list[int] = []
        self._unbacked = list(range(n - 1, -1, -1))  # descending: pop() gives the lowest slot
        self._allocated = bytearray(layout.num_blocks)
        self.ops: list[MapOp] | None = [] if record_ops else None
        self.slots = SlotMap(backend, layout, local_device, self.readers, zero_fill)
        self._slot_dev = self.slots.device  # shared list: device of each slot, -1 unbacked

    @property
    def base(self) -> int:
        """Start of the reserved virtual range."""
        return self.slots.base

    # -- allocation ---------------------------------------------------------------------------
    def alloc(self, n: int) -> list[int]:
        """Allocate `n` blocks; all or nothing. Raises CapacityError when limits or devices
        are exhausted, DriverError on other driver failures."""
        with self._lock:
            out: list[int] = []
            try:
                while len(out) < n:
                    slot = self._slot_with_free_blocks()
                    free = self._partial[slot]
                    take = min(n - len(out), len(free))
                    got = free[len(free) - take :][::-1]  # ascending ids
                    del free[len(free) - take :]
                    self._slot_used[slot] += take
                    if not free:
                        del self._partial[slot]
                    for b in got:
                        self._allocated[b] = 1
                    out += got
            except KVTierError:
                self._release_blocks(out)
                self._trim()
                raise
            return out

    def free(self, blocks: Iterable[int]) -> None:
        """Free allocated blocks. A block not allocated (or repeated) raises AllocationError and
        frees nothing. Slots left empty return to the reserve; extras are trimmed."""
        with self._lock:
            blocks = list(blocks)
            if len(set(blocks)) != len(blocks):
                raise AllocationError("free: repeated block ids")
            for b in blocks:
                if not 0 <= b < self.layout.num_blocks or not self._allocated[b]:
                    raise AllocationError(f"free: block {b} is not allocated")
            before = len(self._reserve)
            self._release_blocks(blocks)
            if len(self._reserve) > before:  # a lowered limit bites as soon as slots empty
                self._limits = self._source.current()
                self._trim()

    def _slot_with_free_blocks(self) -> int:
        if self._partial:
            return next(iter(self._partial))
        if self._reserve:
            # local slots first: they are the fastest to read
            idx = next((i for i, s in enumerate(self._reserve) if self._slot_dev[s] == self.local),
                       len(self._reserve) - 1)
            slot = self._reserve.pop(idx)
        else:
            slot = self._grow()
            self._reserve.remove(slot)
        self._partial[slot] = list(reversed(self.layout.slot_blocks(slot)))
        return slot

    def _release_blocks(self, blocks: list[int]) -> None:
        bps = self.layout.blocks_per_slot
        for b in blocks:
            self._allocated[b] = 0
            slot = b // bps
            self._slot_used[slot] -= 1
            self._partial.setdefault(slot, []).append(b)
            if self._slot_used[slot] == 0:
                del self._partial[slot]
                self._reserve.append(slot)

    # -- growth and placement -----------------------------------------------------------------
    def tiers(self) -> list[int]:
        """Devices in placement order: local first, then the shared peers we can reach."""
        order = [self.local]
        for gpu, _ in self._limits.shared:
            if gpu == self.local or gpu in order or gpu >= self.backend.device_count():
                continue
            if all(self.backend.can_access_peer(r, gpu) for r in self.readers):
                order.append(gpu)
        return order

    def _fits(self, device: int) -> bool:
        cost = self.layout.slot_phys_bytes
        total = self._limits.total
        if total is not None and self.mapped_bytes() + cost > total:
            return False
        budget = self._limits.budget(device, self.local)
        return budget is None or self.slots.dev_bytes.get(device, 0) + cost <= budget

    def _grow(self) -> int:
        """Back the lowest unbacked slot on the first tier with room; it joins the reserve."""
        self._limits = self._source.current()
        if not self._unbacked:
            raise CapacityError("elastic pool: every slot is already backed")
        slot = self._unbacked[-1]
        for tier, dev in enumerate(self.tiers()):
            if self._fits(dev) and self.slots.map_slot(slot, dev):
                self._unbacked.pop()
                self._reserve.append(slot)
                if self.ops is not None:
                    self.ops.append(MapOp("map", slot * self.layout.slot_bytes, tier))
                return slot
        raise CapacityError(
            f"elastic pool: no room for a {self.layout.slot_phys_bytes}-byte slot on devices "
            f"{self.tiers()} (mapped {self.mapped_bytes()}, limit {self._limits.total})"
        )

    def _unmap_slot(self, slot: int) -> None:
        self.slots.unmap_slot(slot)
        bisect.insort(self._unbacked, slot, key=lambda s: -s)
        if self.ops is not None:
            self.ops.append(MapOp("unmap", slot * self.layout.slot_bytes, -1))

    # -- limits, trimming, shrinking ----------------------------------------------------------
    def _over(self, dev: int) -> bool:
        total = self._limits.total
        if total is not None and self.mapped_bytes() > total:
            return True
        budget = self._limits.budget(dev, self.local)
        return budget is not None and self.slots.dev_bytes.get(dev, 0) > budget

    def _any_over(self) -> bool:
        return any(self._over(d) for d in self.slots.dev_bytes)

    def _trim(self, keep: int | None = None) -> int:
        """Unmap reserve slots beyond `keep` (default K) or over a limit; peers go first."""
        keep = self.reserve_target if keep is None else keep
        released = 0
        while self._reserve:
            over = ([s for s in self._reserve if self._over(self._slot_dev[s])]
                    if self._any_over() else [])
            if not over and len(self._reserve) <= keep:
                break
            victim = max(over or self._reserve,
                         key=lambda s: (self._slot_dev[s] != self.local, s))
            self._reserve.remove(victim)
            self._unmap_slot(victim)
            released += self.layout.slot_phys_bytes
        return released

    def shrink(self, target_bytes: int | None = None) -> int:
        """Release free mapped slots (peers first) until mapped bytes fit `target_bytes`
        (default: the current limit; with no limit, the whole reserve goes). Used slots stay:
        see `victims()` for which blocks to evict first. Returns bytes given back."""
        with self._lock:
            self._limits = self._source.current()
            target = self._limits.total if target_bytes is None else target_bytes
            released = self._trim()
            while self._reserve and (target is None or self.mapped_bytes() > target):
                victim = max(self._reserve, key=lambda s: (self._slot_dev[s] != self.local, s))
                self._reserve.remove(victim)
                self._unmap_slot(victim)
                released += self.layout.slot_phys_bytes
            self._source.publish(self.usage(), force=True)
            return released

    def victims(self, nbytes: int) -> list[list[int]]:
        """Page-aware eviction advice: groups of allocated blocks, one group per used slot,
        whose freeing returns at least `nbytes` to the driver. Peer slots and nearly empty
        slots come first, so each evicted block brings a whole page closer to release."""
        with self._lock:
            used = [s for s in range(self.layout.num_slots) if self._slot_used[s] > 0]
            used.sort(key=lambda s: (self._slot_dev[s] == self.local, self._slot_used[s], -s))
            out: list[list[int]] = []
            freed = 0
            for s in used:
                if freed >= nbytes:
                    break
                out.append([b for b in self.layout.slot_blocks(s) if self._allocated[b]])
                freed += self.layout.slot_phys_bytes
            return out

    def maintain(self) -> int:
        """Re-read limits, trim what is over them, top the reserve up to K; publish usage.
        Returns the number of slots newly mapped. Call it off the hot path (a timer)."""
        with self._lock:
            self._limits = self._source.current()
            self._trim()
            grown = 0
            while len(self._reserve) < self.reserve_target and self._unbacked:
                try:
                    self._grow()
                except CapacityError:
                    break
                grown += 1
            self._source.publish(self.usage())
            return grown

    # -- tensor parallel followers ------------------------------------------------------------
    def _follow(self, op: MapOp, tiers: list[int]) -> None:
        """Apply one leader decision (see vmm_sync.apply_ops)."""
        slot = op.va_offset // self.layout.slot_bytes
        if op.op == "map":
            if self._slot_dev[slot] != -1 or not 0 <= op.tier < len(tiers):
                raise AllocationError(f"apply: cannot map slot {slot} on tier {op.tier}")
            if not self.slots.map_slot(slot, tiers[op.tier]):
                raise CapacityError(f"apply: tier {op.tier} has no room for slot {slot}")
            self._unbacked.remove(slot)
            self._reserve.append(slot)
        elif op.op == "unmap":
            if slot not in self._reserve:
                raise AllocationError(f"apply: slot {slot} is not a free mapped slot")
            self._reserve.remove(slot)
            self._unmap_slot(slot)
        else:
            raise AllocationError(f"apply: unknown op {op.op!r}")

    def drain_ops(self) -> list[MapOp]:
        """Mapping decisions since the last drain (needs record_ops=True)."""
        with self._lock:
            if self.ops is None:
                raise AllocationError("drain_ops: pool was created without record_ops")
            out, self.ops = self.ops, []
            return out

    # -- introspection ------------------------------------------------------------------------
    def mapped_bytes(self) -> int:
        return self.slots.mapped_bytes()

    def usage(self) -> dict[int, int]:
        return self.slots.usage()

    def device_of(self, block: int) -> int:
        """The device whose memory holds `block`, or -1 when it is unbacked."""
        return self._slot_dev[self.layout.slot_of(block)]

    def is_backed(self, block: int) -> bool:
        return self.device_of(block) != -1

    def stats(self) -> PoolStats:
        with self._lock:
            per_slot = self.layout.regions * self.layout.pages_per_slot
            pages = {d: b // self.layout.slot_phys_bytes * per_slot
                     for d, b in self.usage().items()}
            used = sum(1 for u in self._slot_used if u)
            return PoolStats(pages, self.usage(), used, len(self._reserve), len(self._unbacked),
                             sum(self._slot_used), self.layout.num_blocks, self._limits.total)

    def lock(self) -> threading.RLock:
        """The pool's lock, for helpers that make several calls atomically."""
        return self._lock

    def check_integrity(self) -> None:
        """Raise AssertionError if bookkeeping and mappings disagree (see elastic_check)."""
        from kvtier.memory.elastic_check import check_pool

        with self._lock:
            check_pool(self)

    def close(self) -> None:
        """Unmap and release everything, then free the reservation. Allocated blocks are lost."""
        with self._lock:
            self.slots.close()
            self._partial.clear()
            self._reserve.clear()
            self._unbacked = list(range(self.layout.num_slots - 1, -1, -1))
            self._slot_used = [0] * self.layout.num_slots
            self._allocated = bytearray(self.layout.num_blocks)
            self.ops = None if self.ops is None else []
