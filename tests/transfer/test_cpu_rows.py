"""The one-pass CPU path (RowCopier) against the reference torch path, bit for bit, with its
C row copier and with the torch/numpy copies it falls back to."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.geometry.spec import KVGeometry
from kvtier.memory.host_pool import HostPool
from kvtier.transfer import native
from kvtier.transfer.cpu_rows import RowCopier
from kvtier.transfer.torch_path import host_planes, load_cpu, store_cpu
from tests.transfer.transfer_kv_fixtures import ADAPTERS, MLA_ADAPTERS, build

DTYPES = ("float32", "bfloat16", "float8_e4m3fn")
NATIVE = [
    pytest.param(True, id="native", marks=pytest.mark.skipif(
        native.library() is None, reason="kvtier's C row copier is not built here")),
    pytest.param(False, id="fallback"),
]


def outside_payloads(pool: HostPool) -> torch.Tensor:
    """A copy of every pool byte that is not a slot payload (headers, padding)."""
    rows = pool.tensor.view(-1)[: pool.num_slots * pool.slot_bytes].view(pool.num_slots, -1)
    end = pool.payload_offset + pool.payload_bytes
    return torch.cat([rows[:, : pool.payload_offset], rows[:, end:]], dim=1).clone()


@contextlib.contextmanager
def copier(use_native: bool) -> Iterator[None]:
    """RowCopiers made inside use the C copier (native) or torch/numpy copies."""
    with pytest.MonkeyPatch.context() as mp:
        if not use_native:
            mp.setattr(native, "library", lambda: None)
        yield


def _pair(kind: str, g: KVGeometry, bs: int, nb: int, seed: int):  # type: ignore[no-untyped-def]
    """Two identical engines (one for RowCopier, one for the reference) and their host views."""
    dkv, _, _ = build(kind, g, bs, nb, seed)
    ref, _, _ = build(kind, g, bs, nb, seed)
    pools = [HostPool(nb, g.page_bytes, pin=False) for _ in range(2)]
    for p in pools:
        p.payloads().fill_(0x5A)
    return dkv, ref, host_planes(pools[0], dkv), host_planes(pools[1], ref), pools


@pytest.mark.parametrize("use_native", NATIVE)
@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(ADAPTERS + MLA_ADAPTERS),
    dtype=st.sampled_from(DTYPES),
    layers=st.integers(1, 4),
    heads=st.sampled_from([1, 2, 3]),
    head_size=st.sampled_from([4, 8, 12, 32]),  # 32: 64-byte rows, streamed stores
    split=st.sampled_from([1, 2]),
    seed=st.integers(0, 1000),
    grain=st.sampled_from([1, 24, 96, 32768]),
    data=st.data(),
)
def test_matches_reference(
    use_native: bool,
    kind: str,
    dtype: str,
    layers: int,
    heads: int,
    head_size: int,
    split: int,
    seed: int,
    grain: int,
    data: st.DataObject,
) -> None:
    """Also with stores cut into calls of 1, a few, or all of a page's rows (grain)."""
    import kvtier.transfer.cpu_rows as cpu_rows

    with pytest.MonkeyPatch.context() as mp, copier(use_native):
        mp.setattr(cpu_rows, "_ATEN_GRAIN", grain)
        mla = kind in MLA_ADAPTERS
        page = 4 if kind.startswith("sglang") else 4 * split
        bs = page if kind.startswith("sglang") else 4
        g = KVGeometry(layers, 1 if mla else heads, head_size, page, dtype, mla=mla)
        nb = 12
        dkv, ref, host, ref_host, pools = _pair(kind, g, bs, nb, seed)
        n = dkv.blocks_per_page
        pages = data.draw(st.integers(0, nb // n))
        perm = torch.randperm(nb, generator=torch.Generator().manual_seed(seed))
        blocks = perm[: pages * n].view(pages, n)
        slots = torch.tensor(data.draw(st.permutations(range(nb)))[:pages], dtype=torch.int64)
        rows = RowCopier(dkv, host)
        around = outside_payloads(pools[0])
        rows.store(blocks, slots)
        store_cpu(ref, ref_host, blocks, slots)
        assert torch.equal(pools[0].payloads(), pools[1].payloads())
        assert torch.equal(outside_payloads(pools[0]), around)
        # load into other blocks, optionally one layer only
        back = torch.roll(perm, 3)[: pages * n].view(pages, n)
        planes = None
        if data.draw(st.booleans()):
            planes = dkv.write_planes(range(layers - 1, layers))
        rows.load(slots, back, planes)
        load_cpu(ref, ref_host, slots, back, planes)
        for a, b in zip(dkv.planes, ref.planes):
            assert torch.equal(a, b)


@pytest.mark.parametrize("use_native", NATIVE)
def test_load_touches_only_its_rows(use_native: bool) -> None:
    g = KVGeometry(3, 2, 16, 4, "bfloat16")
    dkv, _, host, _, pools = _pair("vllm", g, 4, 16, seed=1)
    before = [p.clone() for p in dkv.planes]
    with copier(use_native):
        RowCopier(dkv, host).load(torch.tensor([5, 2]), torch.tensor([[7], [3]]))
    for p, old in zip(dkv.planes, before):
        changed = (p != old).any(dim=1).nonzero().flatten().tolist()
        assert set(changed) <= {3, 7}
        landed = p[[3, 7]].view(torch.uint8)
        assert torch.equal(landed, torch.full_like(landed, 0x5A))
    pools[0].check_integrity()


@pytest.mark.parametrize("use_native", NATIVE)
def test_out_of_range_block_or_slot_is_refused_before_any_copy(use_native: bool) -> None:
    g = KVGeometry(2, 1, 8, 4, "float32")
    dkv, _, host, _, pools = _pair("vllm", g, 4, 8, seed=2)
    with copier(use_native):
        rows = RowCopier(dkv, host)
    snapshot = pools[0].tensor.clone()
    planes = [p.clone() for p in dkv.planes]
    with pytest.raises(ValueError, match="block out of range"):
        rows.store(torch.tensor([[1], [8]]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="block out of range"):
        rows.load(torch.tensor([0]), torch.tensor([[-1]]))
    with pytest.raises(ValueError, match="slot out of range"):
        rows.store(torch.tensor([[1], [2]]), torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="slot out of range"):
        rows.load(torch.tensor([-1]), torch.tensor([[3]]))
    assert torch.equal(pools[0].tensor, snapshot)
    assert all(torch.equal(a, b) for a, b in zip(dkv.planes, planes))


def test_refuses_non_cpu_memory() -> None:
    g = KVGeometry(1, 1, 8, 4, "float32")
    dkv, _, host, _, _ = _pair("vllm", g, 4, 4, seed=3)
    with pytest.raises(ValueError, match="CPU memory only"):
        RowCopier(dkv, host.to("meta"))


@pytest.mark.parametrize("use_native", NATIVE)
@pytest.mark.parametrize("kind", ["vllm", "vllm_shared", "cross_layer"])
def test_threaded_split_matches_reference(
    kind: str, use_native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kvtier.transfer.cpu_rows as cpu_rows

    monkeypatch.setattr(cpu_rows, "_THREAD_MIN_BYTES", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    g = KVGeometry(4, 2, 16, 8, "bfloat16")
    dkv, ref, host, ref_host, pools = _pair(kind, g, 4, 40, seed=5)
    blocks = torch.randperm(40, generator=torch.Generator().manual_seed(5))[:38].view(19, 2)
    slots = torch.tensor([*range(3, 12), 30, 29, 20, *range(33, 40)])  # runs and singles
    with copier(use_native):
        rows = RowCopier(dkv, host)
    monkeypatch.setattr(cpu_rows, "_ATEN_GRAIN", 3 * rows.row_elems)  # 3 rows a call
    around = outside_payloads(pools[0])
    rows.store(blocks, slots)
    store_cpu(ref, ref_host, blocks, slots)
    assert torch.equal(pools[0].payloads(), pools[1].payloads())
    assert torch.equal(outside_payloads(pools[0]), around)
    back = blocks.flip(0)
    rows.load(slots, back)
    load_cpu(ref, ref_host, slots, back)
    for a, b in zip(dkv.planes, ref.planes):
        assert torch.equal(a, b)
    assert rows._pool is not None
