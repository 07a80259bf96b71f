"""Registration plans: region dedupe, descriptor counts and exact byte coverage."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.errors import ConfigError
from kvtier.geometry.groups import KVCacheSpec, uniform_spec
from kvtier.transfer.registration import (
    BlockRun,
    RegistrationPlan,
    TensorMemory,
    block_runs,
    merge_regions,
    paired_runs,
)


def hybrid(num_blocks: int, kv_split: bool = False) -> KVCacheSpec:
    kinds = ["full" if (i + 1) % 6 == 0 else "sliding" for i in range(34)]
    return uniform_spec(kinds, 2, 32, 16, num_blocks, "float16", 256, kv_split)


def separate(spec: KVCacheSpec, base: int = 1 << 30, gap: int = 4096) -> dict[str, TensorMemory]:
    out, addr = {}, base
    for t in spec.tensors:
        out[t.name] = TensorMemory(addr, t.size_bytes)
        addr += t.size_bytes + gap
    return out


def test_merge_regions_dedupes_and_merges_overlaps() -> None:
    regions = merge_regions([(100, 50, -1), (100, 50, -1), (120, 100, -1), (300, 10, -1),
                             (310, 10, -1), (100, 50, 0)])
    assert [(r.base, r.nbytes, r.device) for r in regions] == [
        (100, 120, -1), (300, 10, -1), (310, 10, -1), (100, 50, 0)]
    assert regions[0].mem_type == "DRAM" and regions[-1].mem_type == "VRAM"


def test_runs() -> None:
    assert block_runs([3, 4, 5, 9, 1, 2]) == [BlockRun(3, 3), BlockRun(9, 1), BlockRun(1, 2)]
    assert paired_runs([1, 2, 3, 4], [7, 8, 20, 21]) == [
        (BlockRun(1, 2), BlockRun(7, 2)), (BlockRun(3, 2), BlockRun(20, 2))]
    with pytest.raises(ConfigError):
        paired_runs([1], [1, 2])


def test_hybrid_regions_and_descriptor_counts() -> None:
    spec = hybrid(32)
    plan = RegistrationPlan(spec, separate(spec))
    assert len(plan.regions) == 5  # 34 layers, 5 tensors, 5 registrations
    # one descriptor per tensor of the group and contiguous run
    full = next(g for g, grp in enumerate(spec.groups) if grp.kind == "full_attention")
    assert len(plan.request_descriptors({full: [4, 5, 6, 7]})) == 5
    assert len(plan.request_descriptors({full: [4, 5, 9, 10]})) == 10
    last = next(g for g, grp in enumerate(spec.groups) if len(grp.layers) == 4)
    descs = plan.request_descriptors({full: [0, 1], last: [2]})
    assert len(descs) == 5 + 4
    assert sum(d.nbytes for d in descs) == 2 * spec.request_block_bytes(full) + \
        spec.request_block_bytes(last)


def test_tensors_sharing_one_buffer_register_once() -> None:
    spec = uniform_spec(["full"] * 4, 2, 32, 16, 8, "float32")
    size = spec.tensors[0].size_bytes
    views = {t.name: TensorMemory(4096 + i * size, size) for i, t in enumerate(spec.tensors)}
    views["kv1"] = TensorMemory(4096, 2 * size)  # overlaps kv0 and kv1: merged with both
    plan = RegistrationPlan(spec, views)
    assert len(plan.regions) == 3
    assert plan.place("kv0") == (0, 0) and plan.place("kv1") == (0, 0)
    same = {t.name: TensorMemory(4096, size) for t in spec.tensors}  # all the same tensor
    assert len(RegistrationPlan(spec, same).regions) == 1


def test_kv_split_two_descriptors_per_run() -> None:
    spec = uniform_spec(["full"] * 2, 2, 32, 16, 8, "float32", kv_split=True)
    plan = RegistrationPlan(spec, separate(spec))
    descs = plan.request_descriptors({0: [1, 2]})
    half = spec.block_bytes(0) // 2
    assert [(d.offset, d.nbytes) for d in descs[:2]] == [(half, 2 * half), (9 * half, 2 * half)]


def test_bad_inputs() -> None:
    spec = hybrid(8)
    mems = separate(spec)
    with pytest.raises(ConfigError, match="block ids"):
        RegistrationPlan(spec, mems).request_descriptors({0: [8]})
    with pytest.raises(ConfigError, match="group"):
        RegistrationPlan(spec, mems).request_descriptors({99: [0]})
    plan = RegistrationPlan(spec, mems)
    plan.check_blocks({0: [7, 0, 3], 1: []})  # the cheap check agrees with request_descriptors
    for bad, what in (({0: [2, 8]}, "block ids"), ({0: [-1]}, "block ids"), ({99: [0]}, "group"),
                      ({99: []}, "group")):
        with pytest.raises(ConfigError, match=what):
            plan.check_blocks(bad)
    del mems["kv3"]
    with pytest.raises(ConfigError, match="memory for every tensor"):
        RegistrationPlan(spec, mems)
    small = separate(spec)
    small["kv0"] = TensorMemory(small["kv0"].base, 10)
    with pytest.raises(ConfigError, match="nbytes"):
        RegistrationPlan(spec, small)


def _covered(plan: RegistrationPlan, descs: list) -> list[tuple[int, int]]:
    out = []
    for addr, n, _ in plan.addresses(descs):
        out.extend((a, 1) for a in range(addr, addr + n, 64))  # 64 divides every block size here
    return sorted(out)


def _expected(spec: KVCacheSpec, mems: dict[str, TensorMemory], blocks: dict[int, list[int]]):
    """Reference: the bytes each (group, block) owns, one layer-tensor at a time."""
    out = []
    for g, ids in blocks.items():
        bb = spec.block_bytes(g)
        for t in spec.tensors_of_group(g):
            base = mems[t.name].base
            for b in ids:
                if t.kv_split:
                    half = bb // 2
                    spans = [(base + b * half, half), (base + (spec.num_blocks + b) * half, half)]
                else:
                    spans = [(base + b * bb, bb)]
                for a, n in spans:
                    out.extend((x, 1) for x in range(a, a + n, 64))
    return sorted(out)


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(["plain", "hybrid", "mla"]), kv_split=st.booleans(),
       data=st.data())
def test_descriptors_cover_exactly_the_blocks(kind: str, kv_split: bool, data) -> None:
    nb = 12
    if kind == "plain":
        spec = uniform_spec(["full"] * 3, 1, 32, 16, nb, "float16", kv_split=kv_split)
    elif kind == "hybrid":
        spec = uniform_spec(["sliding", "sliding", "full"] * 2 + ["sliding"], 1, 32, 16, nb,
                            "float16", 64, kv_split)
    else:
        spec = uniform_spec(["mla"] * 3, 1, 64, 16, nb, "float16")
    mems = separate(spec)
    plan = RegistrationPlan(spec, mems)
    pool = data.draw(st.permutations(range(nb)))
    blocks: dict[int, list[int]] = {}
    for g in range(len(spec.groups)):
        k = data.draw(st.integers(0, 3))
        blocks[g], pool = list(pool[:k]), pool[k:]
    blocks = {g: ids for g, ids in blocks.items() if ids}
    descs = plan.request_descriptors(blocks)
    assert _covered(plan, descs) == _expected(spec, mems, blocks)
    split = 2 if spec.tensors[0].kv_split else 1
    assert len(descs) == sum(len(spec.tensors_of_group(g)) * len(block_runs(ids)) * split
                             for g, ids in blocks.items())
    # a transfer into a permuted destination: aligned lists of equal sizes
    dst_mems = separate(spec, base=1 << 40)
    dst = RegistrationPlan(spec, dst_mems)
    dst_blocks = {g: [nb - 1 - b for b in ids] for g, ids in blocks.items()}
    local, remote = plan.transfer_descriptors(blocks, dst, dst_blocks)
    assert [d.nbytes for d in local] == [d.nbytes for d in remote]
    assert _covered(dst, remote) == _expected(spec, dst_mems, dst_blocks)


def test_transfer_descriptors_coalesce_whole_region_runs() -> None:
    spec = uniform_spec(["full"] * 4, 2, 32, 16, 8, "float32")
    size = spec.tensors[0].size_bytes
    one_buffer = {t.name: TensorMemory(4096 + i * size, size) for i, t in enumerate(spec.tensors)}
    # kv0 handed over as the whole buffer: one region (touching extents alone stay apart)
    one_buffer["kv0"] = TensorMemory(4096, 4 * size)
    a = RegistrationPlan(spec, one_buffer)
    b = RegistrationPlan(spec, {k: TensorMemory(m.base + (1 << 30), m.nbytes)
                                for k, m in one_buffer.items()})
    assert len(a.regions) == len(b.regions) == 1
    every = list(range(spec.num_blocks))
    local, remote = a.transfer_descriptors({0: every}, b, {0: every})
    assert len(local) == len(remote) == 1  # four layers, one buffer: one copy
    assert local[0].nbytes == remote[0].nbytes == 4 * size
    # a partial run ends before the next layer starts: one descriptor per layer
    local, remote = a.transfer_descriptors({0: [2, 3]}, b, {0: [2, 3]})
    assert len(local) == 4
    # the destination breaks the adjacency: nothing merges
    local, remote = a.transfer_descriptors({0: every}, b, {0: every[1:] + every[:1]})
    assert len(local) == 4 * 2
    # separate allocations never merge, even when the blocks cover the whole tensor
    sep = RegistrationPlan(spec, separate(spec))
    local, remote = sep.transfer_descriptors({0: every}, sep, {0: every})
    assert len(local) == 4
    assert sum(d.nbytes for d in local) == sum(d.nbytes for d in remote) == 4 * size
