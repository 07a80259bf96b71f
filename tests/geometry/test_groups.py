"""KV cache groups: validation, lookups and the hybrid-allocator layout."""

from __future__ import annotations

import pytest

from kvtier.errors import ConfigError
from kvtier.geometry.groups import (
    AttentionGroup,
    AttentionKind,
    KVCacheSpec,
    KVTensorSpec,
    uniform_spec,
)


def gemma_like(num_blocks: int = 64) -> KVCacheSpec:
    # every 6th layer full attention, the rest sliding window: 34 layers, 5 full
    kinds = ["full" if (i + 1) % 6 == 0 else "sliding" for i in range(34)]
    return uniform_spec(kinds, 4, 32, 16, num_blocks, "float16", sliding_window=512)


def test_hybrid_34_layers_share_5_tensors() -> None:
    spec = gemma_like()
    assert len(spec.tensors) == 5
    assert sum(len(g.layers) for g in spec.groups) == 34
    kinds = [g.kind for g in spec.groups]
    assert kinds.count(AttentionKind.FULL) == 1
    assert kinds.count(AttentionKind.SLIDING_WINDOW) == 6
    # tensor i is shared by the i-th layer of every group, never two layers of one group
    for t in spec.tensors:
        groups = [spec.group_of_layer(layer) for layer in t.layers]
        assert len(groups) == len(set(groups))
    assert spec.tensor_of_layer("layer.5").name == "kv0"
    assert "layer.5" in spec.layers_of_tensor("kv0")
    # the last sliding group has 4 layers: it touches 4 of the 5 tensors
    assert [len(spec.tensors_of_group(g)) for g in range(7)].count(4) == 1


def test_block_bytes() -> None:
    spec = gemma_like()
    assert spec.block_bytes(0) == 2 * 16 * 4 * 32 * 2
    mla = uniform_spec(["mla"] * 3, 1, 576, 16, 8, "bfloat16")
    assert mla.block_bytes(0) == 16 * 576 * 2
    assert mla.request_block_bytes(0) == 3 * 16 * 576 * 2
    assert len(mla.groups) == 1 and len(mla.tensors) == 3


def test_plain_model_one_group_one_tensor_per_layer() -> None:
    spec = uniform_spec(["full"] * 4, 2, 32, 16, 10, "float32")
    assert len(spec.groups) == 1 and len(spec.tensors) == 4
    assert all(len(t.layers) == 1 for t in spec.tensors)


def test_dict_round_trip_and_aliases() -> None:
    spec = gemma_like()
    again = KVCacheSpec.from_dict(spec.as_dict())
    assert again == spec
    d = spec.as_dict()
    d["kv_cache_groups"][0]["kv_cache_spec"]["type"] = "SlidingWindowSpec"  # type: ignore[index]
    d["kv_cache_groups"][0]["kv_cache_spec"]["dtype"] = "torch.float16"  # type: ignore[index]
    assert KVCacheSpec.from_dict(d) == spec


def test_from_vllm_like_object() -> None:
    class FullAttentionSpec:
        block_size, num_kv_heads, head_size, dtype = 16, 2, 32, "torch.bfloat16"

    class Group:
        def __init__(self) -> None:
            self.layer_names, self.kv_cache_spec = ["a", "b"], FullAttentionSpec()

    class Tensor:
        def __init__(self, name: str) -> None:
            self.size, self.shared_by = 4 * 2 * 16 * 2 * 32 * 2, [name]

    class Config:
        def __init__(self) -> None:
            self.num_blocks, self.kv_cache_groups = 4, [Group()]
            self.kv_cache_tensors = [Tensor("a"), Tensor("b")]

    spec = KVCacheSpec.from_vllm(Config())
    assert spec.groups[0].kind is AttentionKind.FULL
    assert spec.tensor_of_layer("b").name == "kv1"


def _group(kind: str, layers: tuple[str, ...], heads: int = 2, window: int | None = None):
    return AttentionGroup(AttentionKind(kind), layers, heads, 32, 16, "float16", window)


def test_layer_in_two_groups_rejected() -> None:
    g1 = _group("full_attention", ("a",))
    g2 = _group("full_attention", ("a",))
    with pytest.raises(ConfigError, match="one group only"):
        KVCacheSpec((g1, g2), (KVTensorSpec("t", 1 << 20, ("a",)),), 4)


def test_tensor_too_small_rejected() -> None:
    g = _group("full_attention", ("a",))
    with pytest.raises(ConfigError, match="size_bytes"):
        KVCacheSpec((g,), (KVTensorSpec("t", 4 * g.block_bytes - 1, ("a",)),), 4)


def test_page_size_mismatch_rejected() -> None:
    g1 = _group("full_attention", ("a",), heads=2)
    g2 = _group("sliding_window", ("b",), heads=4, window=128)
    with pytest.raises(ConfigError, match="one page size"):
        KVCacheSpec((g1, g2), (KVTensorSpec("t", 1 << 20, ("a", "b")),), 4)


def test_layer_without_tensor_and_bad_fields_rejected() -> None:
    g = _group("full_attention", ("a", "b"))
    with pytest.raises(ConfigError, match="a tensor for every layer"):
        KVCacheSpec((g,), (KVTensorSpec("t", 1 << 20, ("a",)),), 4)
    with pytest.raises(ConfigError, match="sliding_window"):
        _group("sliding_window", ("a",))
    with pytest.raises(ConfigError, match="num_kv_heads"):
        AttentionGroup(AttentionKind.MLA, ("a",), 2, 576, 16)
    with pytest.raises(ConfigError, match=r"kv_cache_spec\.type"):
        KVCacheSpec.from_dict({"num_blocks": 1, "kv_cache_tensors": [], "kv_cache_groups": [
            {"layer_names": ["a"], "kv_cache_spec": {"type": "linear", "block_size": 16,
                                                     "num_kv_heads": 1, "head_size": 8}}]})
    with pytest.raises(ConfigError, match="kv_cache_config"):
        KVCacheSpec.from_dict({"num_blocks": 1})
