"""The staged DMA path's chunking and addressing on CPU tensors (the same code the GPU runs, with
tensor copies for the DMA and torch indexing for gather/scatter), bit for bit against the CPU
path; and its planner functions."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transfer_kv_fixtures import ADAPTERS, MLA_ADAPTERS, build

from kvtier.errors import ConfigError
from kvtier.geometry.spec import KVGeometry
from kvtier.memory.host_pool import HostPool
from kvtier.transfer import native
from kvtier.transfer.engine import CopyEngine
from kvtier.transfer.staged_plan import (
    chunk_bounds,
    copy_runs,
    group_layout,
    job_copies,
    plane_runs,
)
from kvtier.transfer.thresholds import Staged, Thresholds

MHA = KVGeometry(3, 2, 16, 8, "bfloat16")
MLA = KVGeometry(3, 1, 40, 8, "bfloat16", mla=True)


def _thresholds(chunk_pages: float, buffers: int, g: KVGeometry) -> Thresholds:
    th = Thresholds.read()
    chunk = max(1, int(chunk_pages * g.page_bytes))
    return dataclasses.replace(th, staged=Staged(chunk_bytes=chunk, buffers=buffers))


def _compare(
    kind: str,
    g: KVGeometry,
    bs: int,
    seed: int,
    *,
    chunk_pages: float = 2.5,
    buffers: int = 2,
    layerwise: bool = False,
    ascending: bool = False,
    consecutive: bool = False,
) -> None:
    """Store then load random pages through the staged engine and the CPU engine on two copies
    of the same data; every host byte and every engine byte must match."""
    rng = random.Random(seed)
    n = g.page_size // bs
    nb, pages, num_slots = 12 * n, 9, 20
    dkv_a, _, ts_a = build(kind, g, bs, nb, seed)
    dkv_b, _, ts_b = build(kind, g, bs, nb, seed)
    pool_a = HostPool(num_slots, g.page_bytes, pin=False)
    pool_b = HostPool(num_slots, g.page_bytes, pin=False)
    for p in (pool_a, pool_b):
        p.tensor.fill_(0xA5)  # headers included: the staged copies must not touch them
    th = _thresholds(chunk_pages, buffers, g)
    staged = CopyEngine(dkv_a, pool_a, path="staged", thresholds=th)
    ref = CopyEngine(dkv_b, pool_b, path="cpu")
    assert staged.path == "staged" and staged.load_path == "staged"
    flat = rng.sample(range(nb), pages * n)
    blocks = torch.tensor(flat).view(pages, n)
    slots = sorted(rng.sample(range(num_slots), pages)) if ascending else None
    slots = slots or rng.sample(range(num_slots), pages)
    slots = list(range(2, 2 + pages)) if consecutive else slots
    for eng in (staged, ref):
        assert eng.wait(eng.submit_store(blocks, slots)).success
    mine = torch.zeros(num_slots, dtype=torch.bool)
    mine[slots] = True
    if staged._staged.layout(range(dkv_a.num_planes)).gap:
        # pages in consecutive slots went out as one copy: the payloads are exact, the padding
        # and headers of the job's own slots undefined (written when sealed); nothing else
        # may change
        assert torch.equal(pool_a.payloads()[slots], pool_b.payloads()[slots]), kind
        assert torch.equal(pool_a.tensor[~mine], pool_b.tensor[~mine]), f"other slots {kind}"
    else:
        assert torch.equal(pool_a.tensor, pool_b.tensor), f"store {kind}"
    noise = torch.randint(0, 256, pool_a.payloads()[slots].shape, dtype=torch.uint8)
    for p in (pool_a, pool_b):
        p.payloads()[slots] = noise
    for t in (*ts_a, *ts_b):
        t.view(torch.uint8).fill_(0x5A)
    lblocks = torch.tensor(rng.sample(range(nb), pages * n)).view(pages, n)
    job = staged.submit_load(slots, lblocks, layerwise=layerwise)
    for layer in range(g.num_layers):
        staged.wait_layer(job, layer)
    assert staged.wait(job).success
    assert ref.wait(ref.submit_load(slots, lblocks)).success
    for a, b in zip(ts_a, ts_b):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"load {kind}"
    # staging memory is bounded by the configuration, whatever the job size
    chunk = max(int(chunk_pages * g.page_bytes), g.page_bytes)
    assert staged._staged.staging_bytes() <= 2 * buffers * (chunk + 256)


@pytest.mark.parametrize("kind", ADAPTERS)
@pytest.mark.parametrize("bs", [8, 4, 1])
def test_staged_matches_cpu_path(kind: str, bs: int) -> None:
    if kind == "sglang" and bs != MHA.page_size:
        pytest.skip("SGLang blocks are whole pages")
    _compare(kind, MHA, bs, seed=bs)


@pytest.mark.parametrize("kind", MLA_ADAPTERS)
def test_staged_mla_layerwise(kind: str) -> None:
    _compare(kind, MLA, MLA.page_size, seed=3, layerwise=True)


@pytest.mark.parametrize("kind", ["vllm", "vllm_shared", "cross_layer"])
@pytest.mark.parametrize("chunk_pages", [0.3, 1, 4, 100])
def test_staged_layerwise_and_chunk_sizes(kind: str, chunk_pages: float) -> None:
    _compare(kind, MHA, 4, seed=7, chunk_pages=chunk_pages, layerwise=True)


@pytest.mark.parametrize("buffers", [1, 3])
def test_staged_ascending_slots_and_buffers(buffers: int) -> None:
    _compare("vllm", MHA, 8, seed=9, buffers=buffers, ascending=True)


# 64 KiB pages: slots of 68 KiB, small enough a gap for whole pages to move one slot apart
BIG = KVGeometry(8, 2, 64, 16, "bfloat16")


@pytest.mark.parametrize("kind", ["vllm", "cross_layer", "sglang"])
@pytest.mark.parametrize("chunk_pages", [1, 2.5, 100])  # 1: one page a chunk, no gap
def test_staged_whole_pages_in_consecutive_slots(kind: str, chunk_pages: float) -> None:
    """Pages in consecutive slots move as one copy per chunk (Layout.gap); stored payloads,
    loaded blocks and every byte outside the job's slots still match the CPU path."""
    dkv, _, _ = build(kind, BIG, 16, 8)
    pool = HostPool(4, BIG.page_bytes, pin=False)
    path = CopyEngine(dkv, pool, path="staged")._staged  # default chunks: many pages
    lay = path.layout(range(dkv.num_planes))
    assert lay.gap == pool.slot_bytes - BIG.page_bytes > 0 and lay.stride == pool.slot_bytes
    jc = job_copies(np.arange(2, 8), lay, path.plane_bytes, pool.slot_bytes,
                    pool.payload_offset, 3)
    assert jc.size.tolist() == [3 * pool.slot_bytes - lay.gap] * 2  # one copy per chunk
    _compare(kind, BIG, 16, seed=4, chunk_pages=chunk_pages, consecutive=True)
    _compare(kind, BIG, 16, seed=5, chunk_pages=chunk_pages, ascending=True)


@settings(max_examples=20, deadline=None)
@given(
    layers=st.integers(1, 4),
    n=st.sampled_from([1, 2, 4]),
    bs=st.sampled_from([1, 2, 4]),
    kind=st.sampled_from(["vllm", "vllm_blocks_first", "cross_layer", "vllm_shared"]),
    chunk_pages=st.sampled_from([0.5, 1, 1.5, 3, 50]),
    layerwise=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_staged_property(
    layers: int, n: int, bs: int, kind: str, chunk_pages: float, layerwise: bool, seed: int
) -> None:
    g = KVGeometry(layers, 2, 8, n * bs, "float16")
    _compare(kind, g, bs, seed, chunk_pages=chunk_pages, layerwise=layerwise)


def test_planner_pieces() -> None:
    assert plane_runs([0, 1, 4, 5, 6, 9]) == ((0, 2), (4, 3), (9, 1))
    assert chunk_bounds(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert chunk_bounds(2, 0) == [(0, 1), (1, 2)]
    lay = group_layout([4, 5], 100)
    assert (lay.p0, lay.span, lay.stride) == (4, 2, 200)
    # two pages in slots 3, 4 of 1000-byte slots (payload at 64): one run per page
    host, stage, size = copy_runs(np.array([3, 4]), lay, 100, 1000, 64)
    assert host.tolist() == [3064 + 400, 4064 + 400]
    assert stage.tolist() == [0, 200] and size.tolist() == [200, 200]
    # headerless contiguous slots merge into one copy
    full = group_layout([0, 1], 100)
    host, stage, size = copy_runs(np.array([5, 6, 7, 2]), full, 100, 200, 0)
    assert host.tolist() == [1000, 400] and stage.tolist() == [0, 600]
    assert size.tolist() == [600, 200]
    # non-contiguous planes (an aliased layer skipped): per-page runs keep the gap
    gap = group_layout([0, 1, 4, 5], 100)
    host, stage, size = copy_runs(np.array([0]), gap, 100, 1000, 0)
    assert host.tolist() == [0, 400] and stage.tolist() == [0, 400]
    assert size.tolist() == [200, 200]
    # whole 800-byte payloads in 848-byte slots (header 48): images one slot apart, and
    # pages in consecutive slots one copy with the 48 bytes between payloads
    whole = group_layout(range(8), 100, 848, 800)
    assert (whole.stride, whole.gap) == (848, 48)
    host, stage, size = copy_runs(np.array([5, 6, 7, 2]), whole, 100, 848, 48)
    assert host.tolist() == [5 * 848 + 48, 2 * 848 + 48] and stage.tolist() == [0, 3 * 848]
    assert size.tolist() == [3 * 848 - 48, 800]
    # a gap over 1/16 of a payload, a partial group, or no pool sizes: images back to back
    assert group_layout(range(8), 100, 900, 800).gap == 0
    assert group_layout(range(7), 100, 848, 800).gap == 0
    assert group_layout(range(8), 100).stride == 800


@pytest.mark.parametrize("use_native", [
    pytest.param(True, marks=pytest.mark.skipif(native.library() is None,
                                                reason="kvtier's native library is not built")),
    False,
])
@settings(max_examples=200, deadline=None)
@given(
    planes=st.sets(st.integers(0, 7), min_size=1),
    n=st.integers(0, 20),
    ppc=st.integers(1, 6),
    order=st.sampled_from(["contiguous", "random", "runs"]),
    header=st.sampled_from([0, 48, 64]),
    whole=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_job_copies_match_per_chunk_copy_runs(
    planes: set[int], n: int, ppc: int, order: str, header: int, whole: bool, seed: int,
    use_native: bool,
) -> None:
    """The plan (native for one-run layouts, else numpy) against per-chunk copy_runs."""
    with pytest.MonkeyPatch.context() as mp:
        if not use_native:
            mp.setattr(native, "library", lambda: None)
        _check_job_copies(planes, n, ppc, order, header, whole, seed)


def _check_job_copies(
    planes: set[int], n: int, ppc: int, order: str, header: int, whole: bool, seed: int
) -> None:
    slot_bytes = 800 + header
    lay = group_layout(sorted(set(range(8)) if whole else planes), 100, slot_bytes, 800)
    rng = np.random.default_rng(seed)
    slots = {
        "contiguous": np.arange(n) + 3,
        "random": rng.permutation(40)[:n],
        # ascending and descending runs of various lengths, some slots consecutive
        "runs": np.concatenate([np.arange(4), [9, 8, 7], np.arange(20, 33)])[:n],
    }[order]
    jc = job_copies(slots, lay, 100, slot_bytes, header, ppc)
    # the driver's form: chunk c staged in buffer bufs[c], the pool at `base`
    bufs = rng.integers(1 << 40, 1 << 41, size=len(chunk_bounds(n, ppc))) * 256
    base = int(rng.integers(1 << 30, 1 << 31)) * 4096
    ab = job_copies(slots, lay, 100, slot_bytes, header, ppc, bufs, base)
    assert jc.bounds.size == len(chunk_bounds(n, ppc)) + 1 and jc.bounds[-1] == jc.host.size
    assert np.array_equal(ab.bounds, jc.bounds) and np.array_equal(ab.size, jc.size)
    for c, (lo, hi) in enumerate(chunk_bounds(n, ppc)):
        a, b = jc.bounds[c], jc.bounds[c + 1]
        want = copy_runs(slots[lo:hi], lay, 100, slot_bytes, header)
        for got, exp in zip((jc.host[a:b], jc.stage[a:b], jc.size[a:b]), want):
            assert np.array_equal(got, exp), c
        assert np.array_equal(ab.host[a:b], want[0] + base), c
        assert np.array_equal(ab.stage[a:b], want[1] + bufs[c]), c
        # independently: every planned plane of the chunk's pages lies inside one copy that
        # maps it to its staging place, and no copy reaches a slot outside the chunk's
        mine = set(slots[lo:hi].tolist())
        for h, _, sz in zip(*(w.tolist() for w in want)):
            assert set(range(h // slot_bytes, (h + sz - 1) // slot_bytes + 1)) <= mine, c
        for i, s_ in enumerate(slots[lo:hi].tolist()):
            for q, k in lay.runs:
                at = s_ * slot_bytes + header + q * 100
                shift = i * lay.stride + (q - lay.p0) * 100 - at
                assert any(h <= at and at + k * 100 <= h + sz and st_ - h == shift
                           for h, st_, sz in zip(*(w.tolist() for w in want))), (c, i, q)


def test_auto_choice_and_config() -> None:
    g = MHA
    dkv, _, _ = build("vllm", g, 4, 40)
    pool = HostPool(16, g.page_bytes, pin=False)
    # CPU tensors: "auto" stays on the CPU path; "staged" is accepted for both directions
    assert CopyEngine(dkv, pool).path == "cpu"
    eng = CopyEngine(dkv, pool, path="cpu", load_path="staged")
    assert (eng.path, eng.load_path) == ("cpu", "staged")
    th = dataclasses.replace(
        Thresholds.read(), staged=Staged(min_job_bytes=4 * g.page_bytes, min_run_bytes=0)
    )
    eng = CopyEngine(dkv, pool, thresholds=th)
    every = [list(range(dkv.num_planes))]
    assert eng._auto_staged(4, every) and not eng._auto_staged(3, every)
    per_layer = [dkv.write_planes(range(la, la + 1)) for la in range(g.num_layers)]
    plane_bytes = dkv.blocks_per_page * dkv.block_bytes
    th2 = dataclasses.replace(th, staged=Staged(min_job_bytes=0, min_run_bytes=3 * plane_bytes))
    eng2 = CopyEngine(dkv, pool, thresholds=th2)
    assert eng2._auto_staged(8, every) and not eng2._auto_staged(8, per_layer)
    with pytest.raises(ConfigError):
        Staged.from_dict({"buffers": 0})
    with pytest.raises(ConfigError):
        Staged.from_dict({"batch": "yes"})
    with pytest.raises(ConfigError):
        Staged.from_dict([1])
    assert Staged.from_dict({"chunk_bytes": 1 << 20, "note": "x"}).chunk_bytes == 1 << 20
