"""The IPC path's row-copy kernel (block ids in, rows straight into another side's tensors)
against torch indexing, bit for bit: compiled on a GPU, through Triton's interpreter
(TRITON_INTERPRET=1) on the CPU. Skipped where triton is not installed (the Makefile runs this
file with the side folder that has it)."""

from __future__ import annotations

import importlib.util
from types import ModuleType

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_pack_rows import _spec, _tensors

from kvtier.transfer.peer_rows import PeerRows, copy_rows_torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton not installed"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KINDS = ["plain_kv_split", "hybrid", "mla_odd"]


@settings(max_examples=16, deadline=None)
@given(kind=st.sampled_from(KINDS), data=st.data(),
       programs=st.sampled_from([None, 0.001]), spread=st.booleans())
def test_kernel_copies_the_requested_rows_like_torch(
    kernels: ModuleType, kind: str, data: st.DataObject, programs: float | None, spread: bool
) -> None:
    spec = _spec(kind)
    # a block id belongs to one group at a time (groups of a hybrid model share tensors)
    blocks = st.permutations(range(spec.num_blocks))
    src_all, dst_all = data.draw(blocks), data.draw(blocks)
    src_ids, dst_ids, at = {}, {}, 0
    for g in range(len(spec.groups)):
        n = data.draw(st.integers(0, min(6, spec.num_blocks - at)))
        src_ids[g], dst_ids[g] = src_all[at : at + n], dst_all[at : at + n]
        at += n
    src = _tensors(spec, 1)
    fast, ref = _tensors(spec, 2), _tensors(spec, 2)
    rows = PeerRows(spec, src, {k: int(v.data_ptr()) for k, v in fast.items()}, kernels,
                    programs, spread)
    moved = rows.copy(src_ids, dst_ids)
    assert moved == copy_rows_torch(spec, src, ref, src_ids, dst_ids)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    for name in src:
        assert torch.equal(fast[name], ref[name]), name
    if moved:  # the copy wrote something, so a kernel that did nothing would fail above
        assert any(not torch.equal(ref[n], _tensors(spec, 2)[n]) for n in ref)
    assert moved == sum(spec.request_block_bytes(g) * len(v) for g, v in src_ids.items())


@pytest.mark.parametrize("spread", [False, True])
def test_kernel_skips_rows_past_each_planes_count(kernels: ModuleType, spread: bool) -> None:
    """Planes with fewer rows than the launch's widest: their extra tiles copy nothing (ids
    past a plane's count belong to the next plane, or to no one)."""
    row, n = 8, 6  # elements per row, rows per plane
    src = torch.arange(2 * n * row, dtype=torch.int64, device=DEVICE)
    dst = torch.full((2 * n * row,), -1, dtype=torch.int64, device=DEVICE)
    # max_rows 4; plane 0: rows 0..n-1 of the buffer, ids [4, 1]; plane 1: rows n.., ids
    # [0, 2, 5, 3]
    planes = torch.tensor([4, 0, 0, 0, 0, 0, 0, 2, n * row, n * row, 2, 4], dtype=torch.int64,
                          device=DEVICE)
    s_ids = torch.tensor([4, 1, 0, 2, 5, 3], dtype=torch.int64, device=DEVICE)
    d_ids = torch.tensor([0, 5, 3, 1, 4, 2], dtype=torch.int64, device=DEVICE)
    kernels.copy_plane_rows_kernel[(3,)](src, dst, planes, s_ids, d_ids, 2, ROW=row,
                                         BLOCK=4, ALIGN=1, SPREAD=spread)
    want = torch.full_like(dst, -1).view(2, n, row)
    view = src.view(2, n, row)
    for p, (s, d) in enumerate([((4, 1), (0, 5)), ((0, 2, 5, 3), (3, 1, 4, 2))]):
        for a, b in zip(s, d):
            want[p, b] = view[p, a]
    assert torch.equal(dst.view(2, n, row), want)


def test_one_rows_object_serves_requests_of_growing_size(kernels: ModuleType) -> None:
    """The tables' buffers are kept between copies and grown when a request needs more."""
    spec = _spec("plain_kv_split")
    src = _tensors(spec, 1)
    fast, ref = _tensors(spec, 2), _tensors(spec, 2)
    rows = PeerRows(spec, src, {k: int(v.data_ptr()) for k, v in fast.items()}, kernels)
    for s, d in [([3], [4]), (list(range(10, 20)), list(range(0, 10))), ([19], [5])]:
        rows.copy({0: s}, {0: d})
        copy_rows_torch(spec, src, ref, {0: s}, {0: d})
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    for name in src:
        assert torch.equal(fast[name], ref[name]), name


@pytest.mark.parametrize("kind", ["plain_kv_split", "hybrid"])
def test_a_replayed_graph_copies_each_requests_own_rows(kernels: ModuleType, kind: str) -> None:
    """A shape seen a second time is captured as a CUDA graph and replayed after that (on a
    GPU; the interpreter always launches directly). Requests of different lengths share one
    graph: a shorter one after a longer must copy its own rows only, not the longer one's
    stale ids."""
    spec = _spec(kind)
    src = _tensors(spec, 1)
    fast, ref = _tensors(spec, 2), _tensors(spec, 2)
    rows = PeerRows(spec, src, {k: int(v.data_ptr()) for k, v in fast.items()}, kernels)
    groups = range(len(spec.groups))
    # 4 then 3 blocks per group share ids capacity and (rounded) grid: one graph key
    for i, n in enumerate([4, 3, 4, 3, 3]):
        # distinct ids across groups (a hybrid model's groups share tensors), new each time
        s = {g: [(g * 5 + j + i * 3) % spec.num_blocks for j in range(n)] for g in groups}
        d = {g: [(b + i * 7) % spec.num_blocks for b in s[g]] for g in groups}
        moved = rows.copy(s, d)
        assert moved == copy_rows_torch(spec, src, ref, s, d)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        for name in src:
            assert torch.equal(fast[name], ref[name]), (i, name)
    assert rows.graphs_captured == (1 if DEVICE == "cuda" else 0), rows.graph_error
