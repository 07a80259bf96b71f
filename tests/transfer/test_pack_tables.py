"""PackRows' row tables, read the way the row-copy kernel reads them, against the per-piece
torch gather: any model (mixed row sizes, several groups, kv_split), any ids, any chunking."""

from __future__ import annotations

import ctypes

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.geometry.groups import AttentionGroup, KVCacheSpec, KVTensorSpec
from kvtier.transfer.pack_plan import chunk_plan
from kvtier.transfer.pack_rows import PackRows


def _spec(heads: tuple[int, ...], kv_split: bool, num_blocks: int) -> KVCacheSpec:
    """One group per entry of `heads` (so row sizes differ), two layers and tensors each."""
    groups, tensors = [], []
    for g, h in enumerate(heads):
        names = (f"g{g}.0", f"g{g}.1")
        group = AttentionGroup("full", names, h, 4, 2, "float16")
        groups.append(group)
        tensors += [KVTensorSpec(n, num_blocks * group.block_bytes, (n,), kv_split)
                    for n in names]
    return KVCacheSpec(tuple(groups), tuple(tensors), num_blocks)


def _kernel_gather(rows: PackRows, c: int) -> bytes:
    """Chunk c gathered by following the tables, as copy_rows_kernel does."""
    base = min(int(t.data_ptr()) for t in rows.tensors.values())
    e = rows.elem
    tables = rows._chunk_tables(c)
    out = bytearray(sum((r.hi - r.lo) * r.row for r in tables.launches) * e)
    for run in tables.launches:
        for k in range(run.lo, run.hi):
            src = base + int(tables.plane_off[k]) * e
            at = int(tables.slot_off[k]) * e
            out[at : at + run.row * e] = ctypes.string_at(src, run.row * e)
    return bytes(out)


@settings(max_examples=80, deadline=None)
@given(
    heads=st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple),
    kv_split=st.booleans(),
    slot_rows=st.integers(1, 12),
    ramp=st.sampled_from([0, 2, 4]),
    data=st.data(),
)
def test_tables_gather_what_torch_gathers(
    heads: tuple[int, ...], kv_split: bool, slot_rows: int, ramp: int, data: st.DataObject
) -> None:
    nb = 16
    spec = _spec(heads, kv_split, nb)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 999)))
    tensors = {t.name: torch.randint(0, 256, (t.size_bytes,), dtype=torch.uint8, generator=gen)
               for t in spec.tensors}
    ids = {g: data.draw(st.lists(st.integers(0, nb - 1), min_size=0, max_size=6))
           for g in range(len(heads))}
    ids = {g: v for g, v in ids.items() if v}
    slot = slot_rows * max(spec.block_bytes(g) for g in range(len(heads)))
    ps, chunks = chunk_plan(spec, {g: len(v) for g, v in ids.items()}, slot,
                            slot // ramp if ramp else 0)
    buf = torch.zeros(slot // 8 + 1, dtype=torch.int64)
    tables = PackRows(tensors, ps, chunks, ids, nb, buf, kernels=object())  # type: ignore[arg-type]
    plain = PackRows(tensors, ps, chunks, ids, nb, buf)
    view = buf.view(torch.uint8)
    if data.draw(st.booleans()):  # all tables ahead, else each chunk's when it is read
        tables.build()
    for c, chunk in enumerate(chunks):
        view.zero_()
        plain.gather(c, 0)
        used = sum((p.hi - p.lo) * ps[p.plane].row_bytes for p in chunk)
        assert _kernel_gather(tables, c) == bytes(view[:used].numpy())
