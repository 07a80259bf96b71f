"""LayerLoader's copy plan and address arithmetic, checked on the CPU with the same 2-D copies
(pointers, pitches, runs) that CUDA's cudaMemcpy2DAsync gets."""

from __future__ import annotations

import random

import pytest
import torch

from kvtier.geometry import KVGeometry
from kvtier.integrations.transformers.kv_io import (
    LayerLoader,
    copy_plan,
    host_copy2d,
    page_runs,
    pages_from_hf,
    write_slots,
)
from kvtier.memory.host_pool import HostPool

G = KVGeometry(3, 2, 8, 4, "float32")  # layers, kv heads, head size, page size


def _pool(slots: int = 64) -> HostPool:
    pool = HostPool(slots, G.page_bytes, pin=False)
    pool.payloads().copy_(torch.randint(0, 256, pool.payloads().shape, dtype=torch.uint8))
    return pool


def _reference(pool: HostPool, slots: list[int], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V of `layer` read page by page from the payloads (no runs, no pointers)."""
    lpb, ks, vs = G.layer_page_bytes, [], []
    for s in slots:
        raw = pool.payloads()[s, layer * lpb : (layer + 1) * lpb].clone()
        page = raw.view(torch.float32).view(2, G.page_size, G.num_kv_heads, G.head_size)
        ks.append(page[0].transpose(0, 1))  # [H][S][D]
        vs.append(page[1].transpose(0, 1))
    return torch.cat(ks, 1).unsqueeze(0), torch.cat(vs, 1).unsqueeze(0)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (random payload bytes include NaNs)."""
    return torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def test_page_runs_and_plan() -> None:
    assert page_runs([5, 6, 7, 2, 3, 9]) == [(5, 3, 0), (2, 2, 3), (9, 1, 5)]
    assert copy_plan(list(range(10, 30))) == ([(10, 20, 0)], None)
    # handed out backwards (a LIFO free list after frees): sorted runs and a gather
    runs, order = copy_plan(list(range(40, 0, -1)))
    assert runs == [(1, 40, 0)] and order == list(range(39, -1, -1))
    # a few scattered runs: direct copies, no gather
    runs, order = copy_plan([3, 4, 9, 10, 0, 1])
    assert order is None and len(runs) == 3


@pytest.mark.parametrize(
    "slots",
    [
        list(range(8, 24)),
        list(range(40, 8, -1)),
        random.Random(1).sample(range(64), 20),
        [7],
        [1, 2, 3, 30, 31, 0],
    ],
    ids=["one-run", "backwards", "shuffled", "single-page", "mixed"],
)
def test_loader_matches_per_page_reference(slots: list[int]) -> None:
    pool = _pool()
    calls: list[int] = []

    def counting(dst: int, dp: int, src: int, sp: int, w: int, h: int, st: int) -> None:
        assert dp == w == G.layer_page_bytes and sp == pool.slot_bytes
        calls.append(h)
        host_copy2d(dst, dp, src, sp, w, h, st)

    loader = LayerLoader(pool, G, slots, torch.device("cpu"), copy2d=counting)
    loader.start()
    runs, _ = copy_plan(slots)
    assert len(calls) == G.num_layers * len(runs)
    assert sum(calls) == G.num_layers * len(slots)
    for layer in range(G.num_layers):
        k, v = loader.wait(layer)
        rk, rv = _reference(pool, slots, layer)
        assert k.shape == (1, G.num_kv_heads, len(slots) * G.page_size, G.head_size)
        assert _same(k, rk) and _same(v, rv)
        assert k.is_contiguous() and v.is_contiguous()
    with pytest.raises(RuntimeError):
        loader.wait(0)  # handed out once
    loader.synchronize()
    assert loader.finished()


def test_single_page_layers_do_not_alias_the_staging_buffer() -> None:
    """With one page, a reshape could be a view of the staging buffer the next layer overwrites."""
    pool = _pool()
    loader = LayerLoader(pool, G, [5], torch.device("cpu"))
    loader.start()
    got = [loader.wait(layer) for layer in range(G.num_layers)]
    for layer, (k, v) in enumerate(got):
        rk, rv = _reference(pool, [5], layer)
        assert _same(k, rk) and _same(v, rv)


def test_store_then_load_round_trip() -> None:
    pool = HostPool(32, G.page_bytes, pin=False)
    n, t = 5, 5 * G.page_size
    ks = [torch.randn(1, G.num_kv_heads, t + 3, G.head_size) for _ in range(G.num_layers)]
    vs = [torch.randn(1, G.num_kv_heads, t + 3, G.head_size) for _ in range(G.num_layers)]
    slots = [20, 21, 3, 4, 11]
    write_slots(pool, slots, pages_from_hf(ks, vs, G, 0, n))
    loader = LayerLoader(pool, G, slots, torch.device("cpu"))
    loader.start()
    for layer in range(G.num_layers):
        k, v = loader.wait(layer)
        assert torch.equal(k, ks[layer][:, :, :t]) and torch.equal(v, vs[layer][:, :, :t])


def test_slot_outside_the_pool_is_refused() -> None:
    with pytest.raises(ValueError):
        LayerLoader(_pool(8), G, [3, 8], torch.device("cpu"))
