"""DeviceKV adapters: plane views, aliasing, refusals; thresholds and DMA run merging."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transfer_kv_fixtures import ADAPTERS, MLA_ADAPTERS, build

from kvtier.errors import ConfigError
from kvtier.geometry.spec import KVGeometry
from kvtier.transfer.device_kv import DeviceKV
from kvtier.transfer.dma import merge_runs
from kvtier.transfer.thresholds import Thresholds

G = KVGeometry(4, 2, 8, 8, "bfloat16")
GM = KVGeometry(2, 1, 24, 8, "bfloat16", mla=True)


@pytest.mark.parametrize("kind", ADAPTERS + MLA_ADAPTERS)
def test_planes_are_views_of_engine_blocks(kind: str) -> None:
    g = GM if "mla" in kind else G
    bs = g.page_size if "sglang" in kind else 4
    dkv, read, _ = build(kind, g, bs, 10)
    assert dkv.num_planes == g.num_layers * g.kv_factor
    assert dkv.num_blocks == 10
    for p, plane in enumerate(dkv.planes):
        layer, kv = divmod(p, g.kv_factor)
        for b in (0, 3, 9):
            assert plane[b].data_ptr() == read(layer, kv, b).data_ptr()
            assert torch.equal(plane[b], read(layer, kv, b).reshape(-1))


def test_shared_tensors_alias_and_load_writes_once() -> None:
    dkv, _, uniq = build("vllm_shared", G, 4, 10)
    assert len(uniq) == 2
    assert dkv.alias_of == (0, 1, 0, 1, 4, 5, 4, 5)
    assert dkv.write_planes() == [0, 1, 4, 5]
    assert dkv.write_planes(range(1, 2)) == []


def test_kv_first_view_of_block_major_memory() -> None:
    mem = torch.randn(10, 2, 4, 2, 8).to(torch.bfloat16)  # block-major memory
    view = mem.permute(1, 0, 2, 3, 4)  # the [2, blocks, ...] shape an engine may hand over
    dkv = DeviceKV.from_vllm([view] * 4, G, 4)
    assert dkv.planes[1].stride(0) == 2 * 4 * 2 * 8
    assert torch.equal(dkv.planes[1][7], mem[7, 1].reshape(-1))
    blocks_first = DeviceKV.from_vllm([mem] * 4, G, 4)
    assert torch.equal(blocks_first.planes[0][3], mem[3, 0].reshape(-1))


def test_refusals() -> None:
    t = torch.zeros(2, 10, 4, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(ConfigError):
        DeviceKV.from_vllm([t] * 3, G, 4)  # wrong layer count
    with pytest.raises(ConfigError):
        DeviceKV.from_vllm([t] * 4, G, 3)  # block size does not divide the page
    with pytest.raises(ConfigError):
        DeviceKV.from_vllm([t.float()] * 4, G, 4)  # 4-byte elements for a bf16 geometry
    hnd = torch.zeros(2, 10, 2, 4, 8, dtype=torch.bfloat16).transpose(2, 3)
    with pytest.raises(ConfigError, match="HND"):
        DeviceKV.from_vllm([hnd] * 4, G, 4)
    with pytest.raises(ConfigError):
        DeviceKV.from_sglang([torch.zeros(80, 2, 8)] * 4, [torch.zeros(80, 2, 8)] * 3, G)
    with pytest.raises(ConfigError):
        DeviceKV.from_mla_buffers([torch.zeros(80, 1, 24)] * 2, G)


def test_thresholds_rules() -> None:
    th = Thresholds.from_dict(
        {
            "store": [
                {"max_items": 100, "dma_min_item_bytes": 4096},
                {"max_items": None, "dma_min_item_bytes": 65536},
            ],
            "load": [{"max_items": None, "dma_min_item_bytes": None}],
        }
    )
    assert th.use_dma("store", 8192, 50)
    assert not th.use_dma("store", 8192, 5000)
    assert th.use_dma("store", 65536, 5000)
    assert not th.use_dma("load", 1 << 30, 1)
    assert Thresholds.read().triton_block_bytes > 0  # the committed file parses
    with pytest.raises(ConfigError):
        Thresholds.from_dict({"triton": {"block_bytes": 3000}})
    assert Thresholds.from_dict({"triton": {"ctas_per_sm": 0}}).triton_ctas_per_sm == 0
    assert Thresholds.from_dict({}).triton_ctas_per_sm > 0  # bounded grid by default
    with pytest.raises(ConfigError):
        Thresholds.from_dict({"triton": {"ctas_per_sm": -1}})


def test_merge_runs() -> None:
    dst = np.array([0, 10, 20, 100, 110], dtype=np.uint64)
    src = np.array([50, 60, 70, 80, 500], dtype=np.uint64)
    d, s, n = merge_runs(dst, src, 10)
    assert d.tolist() == [0, 100, 110]
    assert s.tolist() == [50, 80, 500]
    assert n.tolist() == [30, 10, 10]
