"""describe_block: where a block lives, as the bench's data-mismatch diagnostics print it."""

from __future__ import annotations

from kvtier.memory.elastic import ElasticPool
from kvtier.memory.elastic_check import describe_block
from kvtier.memory.elastic_layout import ElasticLayout, PoolLimits
from kvtier.memory.vmm_sim import SimBackend

G = 4096
LAYOUT = ElasticLayout(regions=4, chunk_bytes=256, num_blocks=64, page_bytes=G)  # 16 per slot


def test_describe_block_states_and_placement() -> None:
    be = SimBackend([2 * LAYOUT.slot_phys_bytes, 4 * LAYOUT.slot_phys_bytes], granularity=G)
    limits = PoolLimits(None, ((1, 4 * LAYOUT.slot_phys_bytes),), local=LAYOUT.slot_phys_bytes)
    pool = ElasticPool(be, LAYOUT, 0, limits, reserve_slots=0)
    try:
        d = describe_block(pool, 40, region=2)
        assert d["mapped"] == "zero page" and d["device"] == -1 and not d["allocated"]
        blocks = pool.alloc(20)  # slot 0 on GPU0 (its budget), slot 1 on GPU1
        d = describe_block(pool, 3, region=1)
        assert d == {"block": 3, "region": 1, "slot": 0, "device": 0, "allocated": True,
                     "page_offset": LAYOUT.region_bytes + 3 * 256 // G * G,
                     "offset_in_page": 3 * 256 % G, "mapped": "own page"}
        d = describe_block(pool, 17, region=3)
        assert (d["slot"], d["device"], d["mapped"]) == (1, 1, "own page")
        assert d["page_offset"] == 3 * LAYOUT.region_bytes + LAYOUT.slot_bytes
        assert describe_block(pool, 25)["allocated"] is False  # backed, not handed out
        # a page of slot 1 replaced behind the pool's back: the diagnostics must say so
        va = pool.base + LAYOUT.slot_bytes
        be.unmap(va, G)
        stray = be.create(0, G)
        be.map(va, G, stray)
        assert describe_block(pool, 16)["mapped"] == "foreign page"
        be.unmap(va, G)
        assert describe_block(pool, 16)["mapped"] == "unmapped"
        be.map(va, G, pool.slots.handles[1][0])  # type: ignore[index]
        be.release(stray)
        pool.check_integrity()
        pool.free(blocks)
    finally:
        pool.close()


def test_describe_block_without_zero_fill() -> None:
    be = SimBackend([4 * LAYOUT.slot_phys_bytes], granularity=G)
    pool = ElasticPool(be, LAYOUT, 0, reserve_slots=0, zero_fill=False)
    try:
        assert describe_block(pool, 5)["mapped"] == "unmapped"
        pool.alloc(1)
        assert describe_block(pool, 0)["mapped"] == "own page"
    finally:
        pool.close()
