"""The packed transfers' row-copy kernel against the per-piece torch indexing, bit for bit:
compiled on a GPU, through Triton's interpreter (TRITON_INTERPRET=1) on the CPU. Skipped where
triton is not installed (the Makefile runs this file with the side folder that has it)."""

from __future__ import annotations

import importlib
import importlib.util
import random
from types import ModuleType

import pytest
import torch

from kvtier.geometry.groups import KVCacheSpec, uniform_spec
from kvtier.transfer.pack_plan import chunk_plan, planes
from kvtier.transfer.pack_rows import PackRows

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton not installed"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _spec(kind: str) -> KVCacheSpec:
    if kind == "plain_kv_split":  # two planes per tensor
        return uniform_spec(["full"] * 3, 2, 32, 16, 20, "float16", kv_split=True)
    if kind == "hybrid":  # groups of different block counts over shared tensors
        kinds = ["sliding", "sliding", "full"] * 2 + ["sliding"]
        return uniform_spec(kinds, 2, 32, 16, 20, "float16", sliding_window=64)
    if kind == "mla_odd":  # 1-head 36-element rows: 72-byte rows, 8-byte elements, no 16B vectors
        return uniform_spec(["mla"] * 2, 1, 36, 1, 20, "bfloat16")
    raise ValueError(kind)


def _tensors(spec: KVCacheSpec, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {t.name: torch.randint(0, 256, (t.size_bytes,), dtype=torch.uint8, generator=gen)
            .to(DEVICE) for t in spec.tensors}


# programs per SM: the default grid, and a grid of one program looping over every tile
# (a CPU "device" counts one SM; a GPU has 132)
@pytest.mark.parametrize("programs", [None, 0.001])
@pytest.mark.parametrize("kind", ["plain_kv_split", "hybrid", "mla_odd"])
def test_kernel_gather_and_scatter_match_torch(
    kernels: ModuleType, kind: str, programs: float | None
) -> None:
    spec = _spec(kind)
    rng = random.Random(kind)
    counts = {g: rng.randint(3, 9) for g in range(len(spec.groups))}
    ids = {g: rng.sample(range(spec.num_blocks), n) for g, n in counts.items()}
    row = max(p.row_bytes for p in planes(spec, counts))
    slot_bytes, k = 3 * row + 40, 2  # several chunks, slots reused, a ragged slot tail
    ps, chunks = chunk_plan(spec, counts, slot_bytes)
    stride = -(-slot_bytes // 256) * 256
    src = _tensors(spec, 1)
    staging = [torch.full((stride * k,), 7, dtype=torch.uint8, device=DEVICE) for _ in range(2)]
    outs = [_tensors(spec, 2) for _ in range(2)]
    fast = [PackRows(src, ps, chunks, ids, spec.num_blocks, staging[0], kernels, programs),
            PackRows(outs[0], ps, chunks, ids, spec.num_blocks, staging[0], kernels, programs)]
    ref = [PackRows(src, ps, chunks, ids, spec.num_blocks, staging[1]),
           PackRows(outs[1], ps, chunks, ids, spec.num_blocks, staging[1])]
    assert len(chunks) > k
    for c in range(len(chunks)):
        at = (c % k) * stride
        fast[0].gather(c, at)
        ref[0].gather(c, at)
        assert torch.equal(staging[0], staging[1]), f"gather of chunk {c}"
        fast[1].scatter(c, at)
        ref[1].scatter(c, at)
    for name in src:
        assert torch.equal(outs[0][name], outs[1][name]), name
    # every requested row landed, and only those
    touched = {p.tensor for p in ps}
    for name in touched:
        assert not torch.equal(outs[0][name], _tensors(spec, 2)[name])
