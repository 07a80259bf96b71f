"""ElasticPool against the simulated backend: placement, limits, shrink, zero fill, faults."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.errors import CapacityError, ConfigError
from kvtier.geometry import KVGeometry
from kvtier.memory.elastic import AllocationError, ElasticPool
from kvtier.memory.elastic_layout import ElasticLayout, PoolLimits, StaticLimits
from kvtier.memory.vmm_backend import DriverError
from kvtier.memory.vmm_sim import SimBackend

G = 4096  # small pages keep the simulated buffers tiny
LAYOUT = ElasticLayout(regions=4, chunk_bytes=256, num_blocks=256, page_bytes=G)
assert LAYOUT.blocks_per_slot == 16
SLOT = LAYOUT.slot_phys_bytes  # 4 pages of 4 KiB, 16 blocks


def make(caps: list[int], limits: PoolLimits | StaticLimits | None = None, k: int = 0,
         **kw: object) -> tuple[SimBackend, ElasticPool]:
    be = SimBackend(caps, granularity=G)
    pool = ElasticPool(be, LAYOUT, 0, limits, reserve_slots=k, **kw)  # type: ignore[arg-type]
    pool.check_integrity()
    return be, pool


def test_layout_arithmetic() -> None:
    geo = KVGeometry(32, 8, 128, 16, "bfloat16")
    lay = ElasticLayout.layer_first(geo, 1000)
    assert lay.regions == 64 and lay.chunk_bytes == 32768
    assert lay.blocks_per_slot == 64 and lay.pages_per_slot == 1
    assert lay.num_blocks == 1024 and lay.num_slots == 16
    assert lay.block_offset(3, 5) == 3 * lay.region_bytes + 5 * 32768
    odd = ElasticLayout(regions=2, chunk_bytes=3 * 1024, num_blocks=10, page_bytes=G)
    assert odd.slot_bytes == 3 * G and odd.pages_per_slot == 3 and odd.blocks_per_slot == 4
    assert ElasticLayout.page_first(geo, 10).regions == 1
    with pytest.raises(ConfigError):
        ElasticLayout(regions=1, chunk_bytes=1000 * 1024 + 1, num_blocks=1, page_bytes=G)


def test_placement_local_then_peers_in_order() -> None:
    # device 0 fits the zero page + 2 slots; peers 2 then 1 as listed in the shared config
    limits = PoolLimits(None, ((2, 2 * SLOT), (1, 10 * SLOT)))
    be, pool = make([G + 2 * SLOT, 100 * SLOT, 100 * SLOT], limits)
    blocks = pool.alloc(16 * 5)
    pool.check_integrity()
    devs = [pool.device_of(b) for b in blocks[::16]]
    assert devs == [0, 0, 2, 2, 1]
    assert pool.usage() == {0: 2 * SLOT, 1: SLOT, 2: 2 * SLOT}
    assert be.used(2) == 2 * SLOT and be.used(1) == SLOT
    assert pool.stats().pages_per_device == {0: 8, 1: 4, 2: 8}
    # bytes really land on the owning device's pages
    va = pool.base + LAYOUT.block_offset(1, blocks[-1])
    be.write(va, b"\x07" * 256, device=0)
    assert be.read(va, 256, device=0) == b"\x07" * 256
    handle = be.mapping(va - va % G)
    assert handle is not None and be.handle_device(handle) == 1


def test_local_budget_sends_pages_to_the_peer() -> None:
    _, pool = make([100 * SLOT, 100 * SLOT], PoolLimits(None, ((1, 2 * SLOT),), local=SLOT))
    blocks = pool.alloc(48)
    assert [pool.device_of(b) for b in blocks[::16]] == [0, 1, 1]
    with pytest.raises(CapacityError):
        pool.alloc(1)
    pool.check_integrity()


def test_total_limit_and_unlisted_peer() -> None:
    _, pool = make([100 * SLOT, 100 * SLOT], PoolLimits(3 * SLOT))
    pool.alloc(48)
    with pytest.raises(CapacityError):
        pool.alloc(1)  # limit reached; GPU 1 is not in the shared list
    pool.check_integrity()
    assert pool.usage() == {0: 3 * SLOT}


def test_alloc_is_all_or_nothing() -> None:
    _, pool = make([G + 2 * SLOT])
    pool.alloc(10)
    with pytest.raises(CapacityError):
        pool.alloc(30)
    pool.check_integrity()
    assert pool.stats().blocks_used == 10
    assert len(pool.alloc(22)) == 22


def test_free_returns_slot_to_reserve_and_trims_beyond_k() -> None:
    be, pool = make([100 * SLOT], k=1)
    a = pool.alloc(16)
    b = pool.alloc(16)
    pool.free(a)
    pool.check_integrity()
    assert pool.stats().slots_reserve == 1
    pool.free(b)  # second empty slot exceeds K=1 and is unmapped
    pool.check_integrity()
    assert pool.stats().slots_reserve == 1 and be.used(0) == G + SLOT
    with pytest.raises(AllocationError):
        pool.free(b)
    with pytest.raises(AllocationError):
        pool.free([9999])
    pool.check_integrity()


def test_reserve_gives_microsecond_allocs_without_driver_calls() -> None:
    be, pool = make([100 * SLOT], k=3)
    assert pool.maintain() == 3
    creates = be.calls["create"]
    blocks = pool.alloc(48)
    assert be.calls["create"] == creates  # served from the pre-mapped reserve
    pool.free(blocks)
    pool.check_integrity()


def test_limit_lowered_at_run_time_stops_growth_and_shrinks() -> None:
    src = StaticLimits(PoolLimits(None, ((1, 100 * SLOT),)))
    be, pool = make([100 * SLOT, 100 * SLOT], src, k=2)
    used = pool.alloc(16 * 4)
    pool.maintain()
    assert pool.mapped_bytes() == 6 * SLOT
    src.set(PoolLimits(4 * SLOT))
    pool.maintain()  # reserve slots are over the limit: released
    pool.check_integrity()
    assert pool.mapped_bytes() == 4 * SLOT and be.used(0) == G + 4 * SLOT
    with pytest.raises(CapacityError):
        pool.alloc(1)
    src.set(PoolLimits(2 * SLOT))
    victims = pool.victims(2 * SLOT)
    assert len(victims) == 2 and all(len(v) == 16 for v in victims)
    pool.free([b for group in victims for b in group])
    pool.check_integrity()
    assert pool.mapped_bytes() == 2 * SLOT
    assert src.published == {} or sum(src.published.values()) >= 0
    rest = [b for b in used if all(b not in g for g in victims)]
    pool.free(rest)
    assert pool.shrink(0) == 2 * SLOT and pool.mapped_bytes() == 0
    pool.check_integrity()


def test_peer_budget_lowered_releases_peer_pages_first() -> None:
    src = StaticLimits(PoolLimits(None, ((1, 4 * SLOT),)))
    be, pool = make([G + 2 * SLOT, 100 * SLOT], src, k=4)
    pool.maintain()
    assert pool.usage() == {0: 2 * SLOT, 1: 2 * SLOT}
    src.set(PoolLimits(None, ((1, SLOT),)))
    pool.maintain()
    pool.check_integrity()
    assert pool.usage() == {0: 2 * SLOT, 1: SLOT} and be.used(1) == SLOT
    assert pool.victims(SLOT) == []  # nothing allocated: nothing to evict


def test_victims_prefer_peer_and_nearly_empty_slots() -> None:
    _, pool = make([G + 2 * SLOT, 100 * SLOT], PoolLimits(None, ((1, 10 * SLOT),)))
    blocks = pool.alloc(16 * 4)
    pool.free(blocks[16:30])  # slot 1 (local) keeps 2 blocks
    groups = pool.victims(SLOT * 3)
    assert [pool.device_of(g[0]) for g in groups] == [1, 1, 0]
    assert groups[2] == blocks[30:32]


def test_unbacked_ranges_read_zero_and_reject_writes() -> None:
    be, pool = make([100 * SLOT])
    va = pool.base + LAYOUT.block_offset(2, 40)
    assert be.read(va, 2048, device=0) == bytes(2048)
    with pytest.raises(DriverError):
        be.write(va, b"x", device=0)
    blocks = pool.alloc(48)
    be.write(va, b"\x01" * 1024, device=0)
    pool.free(blocks)
    pool.shrink(0)
    assert be.read(va, 1024, device=0) == bytes(1024)  # released page: zeros again
    assert be.handle_bytes(be.zero_page(0)) == bytes(G)
    pool.check_integrity()


def test_reused_reserve_slot_keeps_data_until_overwritten() -> None:
    # a slot recycled through the reserve is not cleared (the engine overwrites blocks)
    be, pool = make([100 * SLOT], k=1)
    b = pool.alloc(1)
    va = pool.base + LAYOUT.block_offset(0, b[0])
    be.write(va, b"\x05" * 8, device=0)
    pool.free(b)
    assert pool.alloc(1) == b and be.read(va, 8, device=0) == b"\x05" * 8


@pytest.mark.parametrize("call,after,kind", [
    ("create", 0, "driver"), ("create", 2, "driver"), ("map", 0, "driver"),
    ("map", 3, "driver"), ("set_access", 1, "driver"), ("unmap", 2, "driver"),
])
def test_injected_driver_failures_raise_and_roll_back(call: str, after: int, kind: str) -> None:
    be, pool = make([100 * SLOT])
    first = pool.alloc(16)
    before = (pool.usage(), be.used(0), be.live_handles())
    be.inject(call, after=after, kind=kind)
    with pytest.raises(DriverError):
        pool.alloc(16)
    pool.check_integrity()
    assert (pool.usage(), be.used(0), be.live_handles()) == before
    assert pool.stats().blocks_used == 16
    more = pool.alloc(16)  # the pool still works
    pool.free(first + more)
    pool.check_integrity()


def test_injected_oom_falls_through_to_peer() -> None:
    be, pool = make([100 * SLOT, 100 * SLOT], PoolLimits(None, ((1, 10 * SLOT),)))
    be.inject("create", after=1, kind="oom")  # second page of the local slot fails
    blocks = pool.alloc(16)
    pool.check_integrity()
    assert pool.device_of(blocks[0]) == 1 and be.used(0) == G


def test_oom_everywhere_is_capacity_error() -> None:
    be, pool = make([100 * SLOT])
    be.inject("create", kind="oom")
    with pytest.raises(CapacityError):
        pool.alloc(1)
    pool.check_integrity()
    assert be.used(0) == G


def test_close_returns_everything() -> None:
    be, pool = make([100 * SLOT, 100 * SLOT], PoolLimits(None, ((1, 10 * SLOT),)), k=2)
    pool.alloc(40)
    pool.maintain()
    pool.close()
    be.close()
    assert be.used(0) == be.used(1) == 0 and be.live_handles() == 0


def test_without_zero_fill_unbacked_reads_fault() -> None:
    be, pool = make([100 * SLOT], zero_fill=False)
    with pytest.raises(DriverError):
        be.read(pool.base, 16, device=0)
    pool.alloc(1)
    assert be.read(pool.base, 16, device=0) == bytes(16)
    pool.check_integrity()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 40)), max_size=30),
       st.integers(0, 3), st.integers(2, 12))
def test_random_alloc_free_keeps_integrity(script: list[tuple[bool, int]], k: int,
                                           limit_slots: int) -> None:
    src = StaticLimits(PoolLimits(limit_slots * SLOT, ((1, 3 * SLOT),)))
    be, pool = make([G + 4 * SLOT, 100 * SLOT], src, k=k)
    held: list[int] = []
    for do_alloc, n in script:
        if do_alloc:
            with contextlib.suppress(CapacityError):
                held += pool.alloc(n)
        else:
            pool.free(held[:n])
            del held[:n]
        pool.check_integrity()
        assert pool.mapped_bytes() <= limit_slots * SLOT
        assert len(set(held)) == len(held) == pool.stats().blocks_used
    pool.free(held)
    pool.shrink(0)
    assert be.used(0) == G and be.used(1) == 0
