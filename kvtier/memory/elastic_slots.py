"""SlotMap: the mapping mechanism under an ElasticPool (which slot is backed, by what, where).

It owns the virtual reservation, the physical handles of every backed slot and the zero-page
mappings of the unbacked ones; it decides nothing (placement, limits and block bookkeeping live
in `elastic.ElasticPool`). Every method either completes or leaves mappings and handles exactly
as they were, so a driver failure never leaves a half-backed slot behind.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from kvtier.errors import CapacityError, KVTierError
from kvtier.memory.elastic_layout import ElasticLayout
from kvtier.memory.vmm_backend import DeviceBackend

log = logging.getLogger(__name__)


class SlotMap:
    """Backed/unbacked state of every slot of one reservation. Not thread-safe (the pool
    holds its lock around every call)."""

    def __init__(
        self,
        backend: DeviceBackend,
        layout: ElasticLayout,
        local: int,
        readers: Sequence[int],
        zero_fill: bool,
    ) -> None:
        gran = backend.granularity(local)
        if layout.page_bytes % gran:
            raise KVTierError(f"page_bytes {layout.page_bytes} is not a multiple of the "
                              f"device granularity {gran}")
        self.backend = backend
        self.layout = layout
        self.local = local
        self.readers = list(readers)
        self.zero_fill = zero_fill
        self.device = [-1] * layout.num_slots  # device of each slot, -1 when unbacked
        self.handles: list[list[int] | None] = [None] * layout.num_slots
        self.dev_bytes: dict[int, int] = {}
        self.base = backend.reserve(layout.total_bytes)
        if zero_fill:
            try:
                self._map_zero_all()
            except KVTierError:
                self._unmap_zero_all()
                backend.free_reserve(self.base, layout.total_bytes)
                raise

    def map_slot(self, slot: int, dev: int) -> bool:
        """Create and map every page of `slot` on `dev`, readable and writable by the readers.
        False if `dev` is out of memory; raises (after rolling back) on other failures."""
        be, page = self.backend, self.layout.page_bytes
        offsets = self.layout.slot_pages(slot)
        handles: list[int] = []
        try:
            for _ in offsets:
                handles.append(be.create(dev, page))
        except CapacityError:
            self._release_quietly(handles)
            return False
        except KVTierError:
            self._release_quietly(handles)
            raise
        done: list[int] = []
        try:
            for off, h in zip(offsets, handles):
                va = self.base + off
                if self.zero_fill:
                    be.unmap(va, page)
                done.append(va)
                be.map(va, page, h)
                be.set_access(va, page, self.readers)
        except KVTierError:
            for va in done:
                if be.mapping(va) is not None:
                    be.unmap(va, page)
                if self.zero_fill:
                    self._map_zero(va)
            self._release_quietly(handles)
            raise
        self.device[slot] = dev
        self.handles[slot] = handles
        self.dev_bytes[dev] = self.dev_bytes.get(dev, 0) + self.layout.slot_phys_bytes
        return True

    def unmap_slot(self, slot: int) -> None:
        """Unmap and release every page of a backed slot (zero page back in its place)."""
        be, page = self.backend, self.layout.page_bytes
        handles = self.handles[slot]
        if handles is None:
            raise KVTierError(f"slot {slot} is not backed")
        for off, h in zip(self.layout.slot_pages(slot), handles):
            va = self.base + off
            be.unmap(va, page)
            be.release(h)
            if self.zero_fill:
                self._map_zero(va)
        dev = self.device[slot]
        self.dev_bytes[dev] -= self.layout.slot_phys_bytes
        self.device[slot] = -1
        self.handles[slot] = None

    def mapped_bytes(self) -> int:
        return sum(self.dev_bytes.values())

    def usage(self) -> dict[int, int]:
        return {d: b for d, b in self.dev_bytes.items() if b}

    def close(self) -> None:
        """Unmap everything and free the reservation."""
        for slot in range(self.layout.num_slots):
            if self.device[slot] != -1:
                self.unmap_slot(slot)
        if self.zero_fill:
            self._unmap_zero_all()
        self.backend.free_reserve(self.base, self.layout.total_bytes)

    # -- zero page ----------------------------------------------------------------------------
    def _map_zero(self, va: int) -> None:
        page = self.layout.page_bytes
        self.backend.map(va, page, self.backend.zero_page(self.local))
        self.backend.set_access(va, page, self.readers, read_only=True)

    def _map_zero_all(self) -> None:
        # one map per page (a mapping cannot outgrow its handle), then one access call per
        # region: the init cost is dominated by the maps (about 10 us each on an H100)
        zero, page = self.backend.zero_page(self.local), self.layout.page_bytes
        for off in range(0, self.layout.total_bytes, page):
            self.backend.map(self.base + off, page, zero)
        for r in range(self.layout.regions):
            self.backend.set_access(self.base + r * self.layout.region_bytes,
                                    self.layout.region_bytes, self.readers, read_only=True)

    def _unmap_zero_all(self) -> None:
        zero = self.backend.zero_page(self.local)
        for off in range(0, self.layout.total_bytes, self.layout.page_bytes):
            if self.backend.mapping(self.base + off) == zero:
                self.backend.unmap(self.base + off, self.layout.page_bytes)

    def _release_quietly(self, handles: list[int]) -> None:
        for h in handles:
            try:
                self.backend.release(h)
            except KVTierError as exc:  # a leak is better than a crash; integrity shows it
                log.warning("elastic pool: release of handle %s failed: %s", h, exc)
