"""Integrity proof for an ElasticPool: bookkeeping, device accounting and real mappings agree."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvtier.memory.elastic import ElasticPool


def check_pool(pool: ElasticPool) -> None:
    """Raise AssertionError naming the first disagreement. Reads only; O(pages)."""
    lay, be = pool.layout, pool.backend
    reserve = set(pool._reserve)
    unbacked = set(pool._unbacked)
    assert len(reserve) == len(pool._reserve), "reserve lists a slot twice"
    assert len(unbacked) == len(pool._unbacked), "unbacked lists a slot twice"
    assert pool._unbacked == sorted(pool._unbacked, reverse=True), "unbacked not sorted"
    dev_bytes: dict[int, int] = {}
    zero = be.zero_page(pool.local) if pool.zero_fill else None
    for slot in range(lay.num_slots):
        dev, used = pool._slot_dev[slot], pool._slot_used[slot]
        blocks = lay.slot_blocks(slot)
        allocated = sum(pool._allocated[b] for b in blocks)
        assert allocated == used, f"slot {slot}: {allocated} allocated blocks, count says {used}"
        free = pool._partial.get(slot)
        if dev == -1:
            assert slot in unbacked and slot not in reserve, f"slot {slot}: unbacked misfiled"
            assert used == 0 and free is None, f"slot {slot}: blocks in an unbacked slot"
            assert pool.slots.handles[slot] is None, f"slot {slot}: handles on unbacked slot"
            for off in lay.slot_pages(slot):
                assert be.mapping(pool.base + off) == zero, f"slot {slot}: unbacked page mapped"
            continue
        assert slot not in unbacked, f"slot {slot}: backed slot listed as unbacked"
        assert (slot in reserve) == (used == 0), f"slot {slot}: reserve membership wrong"
        if 0 < used < lay.blocks_per_slot:
            assert free is not None, f"slot {slot}: partly used but not in the partial map"
        if free is not None:
            assert used > 0, f"slot {slot}: empty slot in the partial map"
            assert len(set(free)) == len(free) == lay.blocks_per_slot - used, f"slot {slot}: free"
            assert all(b in blocks and not pool._allocated[b] for b in free), f"slot {slot}: free"
        else:
            assert used in (0, lay.blocks_per_slot), f"slot {slot}: lost free blocks"
        handles = pool.slots.handles[slot]
        assert handles is not None and len(handles) == len(lay.slot_pages(slot))
        for off, h in zip(lay.slot_pages(slot), handles):
            assert be.mapping(pool.base + off) == h, f"slot {slot}: page {off:#x} not mapped"
        dev_bytes[dev] = dev_bytes.get(dev, 0) + lay.slot_phys_bytes
    assert dev_bytes == pool.usage(), f"device bytes {pool.usage()} != recount {dev_bytes}"


def describe_block(pool: ElasticPool, block: int, region: int = 0) -> dict[str, object]:
    """Where `block` of `region` lives, for data-mismatch diagnostics: its slot, the device the
    pool thinks backs it, the page's offset in the reservation, and which handle is really
    mapped there (the slot's own page, the zero page, or something else). Reads only."""
    lay, be = pool.layout, pool.backend
    off = lay.block_offset(region, block)
    page_off = off - off % lay.page_bytes
    slot = lay.slot_of(block)
    mapped = be.mapping(pool.base + page_off)
    handles = pool.slots.handles[slot]
    expected = None
    if handles is not None:
        expected = handles[lay.slot_pages(slot).index(page_off)]
    zero = be.zero_page(pool.local) if pool.zero_fill else None
    if mapped is None:
        state = "unmapped"
    elif mapped == expected:
        state = "own page"
    elif mapped == zero:
        state = "zero page"
    else:
        state = "foreign page"
    return {"block": block, "region": region, "slot": slot, "device": pool.device_of(block),
            "allocated": bool(pool._allocated[block]), "page_offset": page_off,
            "offset_in_page": off - page_off, "mapped": state}
