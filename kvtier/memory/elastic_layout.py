"""How engine block ids map onto physical pages of an elastic pool, and the pool's limits.

The reserved virtual range is split into `regions` equal, contiguous areas: for a layer-first
pool one area per layer and per K/V (`[L][2][blocks][page_size][H][D]`), for a page-first pool
one area for everything (`[blocks][L][2][page_size][H][D]`). Block `b` lives at the same offset
`b * chunk_bytes` inside every region, so the engine can view each region (or the whole range) as
an ordinary strided tensor.

A *slot* is the unit the pool backs: `slot_bytes = lcm(page_bytes, chunk_bytes)` at the same
offset in every region, i.e. `pages_per_slot` physical pages per region and `regions *
pages_per_slot` pages in all, all created on one device. A block is backed when its slot is, and
slot `s` holds blocks `[s * blocks_per_slot, (s + 1) * blocks_per_slot)`. With Llama-3-8B
(16-token pages, 32 KiB chunks) a slot is one 2 MiB page per region and holds 64 blocks.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from kvtier.errors import ConfigError
from kvtier.geometry import KVGeometry
from kvtier.memory.vmm_backend import PAGE_BYTES

_MAX_PAGES_PER_SLOT = 64  # beyond this a slot is too coarse to be elastic


@dataclass(frozen=True)
class ElasticLayout:
    """Block-to-page arithmetic. `num_blocks` is rounded up to whole slots."""

    regions: int
    chunk_bytes: int
    num_blocks: int
    page_bytes: int = PAGE_BYTES
    slot_bytes: int = field(init=False)
    pages_per_slot: int = field(init=False)
    blocks_per_slot: int = field(init=False)
    num_slots: int = field(init=False)
    region_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        for name in ("regions", "chunk_bytes", "num_blocks", "page_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(name, value, "a positive integer")
        slot = math.lcm(self.page_bytes, self.chunk_bytes)
        if slot // self.page_bytes > _MAX_PAGES_PER_SLOT:
            raise ConfigError(
                "chunk_bytes",
                self.chunk_bytes,
                f"a size whose lcm with the {self.page_bytes}-byte page is at most "
                f"{_MAX_PAGES_PER_SLOT} pages (use a power-of-two page_size or head size)",
            )
        bps = slot // self.chunk_bytes
        slots = -(-self.num_blocks // bps)
        object.__setattr__(self, "slot_bytes", slot)
        object.__setattr__(self, "pages_per_slot", slot // self.page_bytes)
        object.__setattr__(self, "blocks_per_slot", bps)
        object.__setattr__(self, "num_slots", slots)
        object.__setattr__(self, "num_blocks", slots * bps)
        object.__setattr__(self, "region_bytes", slots * slot)

    @classmethod
    def layer_first(
        cls, geometry: KVGeometry, num_blocks: int, page_bytes: int = PAGE_BYTES
    ) -> ElasticLayout:
        return cls(geometry.num_layers * geometry.kv_factor, geometry.chunk_bytes, num_blocks,
                   page_bytes)

    @classmethod
    def page_first(
        cls, geometry: KVGeometry, num_blocks: int, page_bytes: int = PAGE_BYTES
    ) -> ElasticLayout:
        return cls(1, geometry.page_bytes, num_blocks, page_bytes)

    @property
    def total_bytes(self) -> int:
        """Virtual bytes to reserve."""
        return self.regions * self.region_bytes

    @property
    def slot_phys_bytes(self) -> int:
        """Physical bytes one backed slot costs."""
        return self.regions * self.slot_bytes

    def block_offset(self, region: int, block: int) -> int:
        """Byte offset of `block` inside `region`, from the start of the reservation."""
        return region * self.region_bytes + block * self.chunk_bytes

    def slot_of(self, block: int) -> int:
        return block // self.blocks_per_slot

    def slot_blocks(self, slot: int) -> range:
        return range(slot * self.blocks_per_slot, (slot + 1) * self.blocks_per_slot)

    def slot_pages(self, slot: int) -> list[int]:
        """Offsets (from the reservation start) of every physical page backing `slot`."""
        base = slot * self.slot_bytes
        return [
            r * self.region_bytes + base + p * self.page_bytes
            for r in range(self.regions)
            for p in range(self.pages_per_slot)
        ]


@dataclass(frozen=True)
class PoolLimits:
    """What a pool may map. `total` caps all devices together (None: only physical memory);
    `shared` lists the peer GPUs the pool may grow onto, in placement order, each with its own
    byte budget; `local` optionally caps the local GPU alone (None: bounded by `total` and its
    physical memory)."""

    total: int | None = None
    shared: tuple[tuple[int, int], ...] = ()
    local: int | None = None

    def budget(self, device: int, local: int) -> int | None:
        """Byte budget for `device` (None: unlimited), 0 if the pool may not use it."""
        if device == local:
            return self.local
        for gpu, nbytes in self.shared:
            if gpu == device:
                return nbytes
        return 0


class LimitSource(ABC):
    """Where a pool reads its limits at run time and reports its usage.

    `current()` is called on the cold path (about every new slot) and by `maintain()`: it must
    be cheap (cache and re-read only on change). `publish()` may be throttled; it must never
    raise for a transient I/O problem (log and skip instead).
    """

    @abstractmethod
    def current(self) -> PoolLimits:
        """The limits in force now."""

    def publish(self, usage: dict[int, int], force: bool = False) -> None:  # noqa: B027
        """Report mapped bytes per device. Default: nowhere."""


class StaticLimits(LimitSource):
    """Limits fixed in code; `set()` changes them (as an operator would through a segment)."""

    def __init__(self, limits: PoolLimits | None = None) -> None:
        self._limits = limits or PoolLimits()
        self.published: dict[int, int] = {}

    def current(self) -> PoolLimits:
        return self._limits

    def set(self, limits: PoolLimits) -> None:
        self._limits = limits

    def publish(self, usage: dict[int, int], force: bool = False) -> None:
        self.published = dict(usage)
