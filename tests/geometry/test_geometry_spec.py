"""KVGeometry: derived sizes, dtype names, presets, and ConfigError naming the bad field."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvtier.errors import ConfigError
from kvtier.geometry import PRESETS, KVGeometry, canonical_dtype, preset, torch_dtype

MiB = 1 << 20


def test_llama3_8b_derived_sizes() -> None:
    g = preset("llama3-8b")
    assert (g.num_layers, g.num_kv_heads, g.head_size, g.page_size) == (32, 8, 128, 16)
    assert g.dtype == "bfloat16" and g.itemsize == 2 and g.kv_factor == 2
    assert g.token_bytes_per_layer == 2 * 8 * 128 * 2 == 4096
    assert g.chunk_bytes == 16 * 8 * 128 * 2 == 32 * 1024
    assert g.layer_page_bytes == 64 * 1024
    assert g.page_bytes == 2 * MiB
    assert g.page_elems == MiB


def test_mla_has_one_latent() -> None:
    g = PRESETS["deepseek-v3-mla"]
    assert g.kv_factor == 1
    assert g.layer_page_bytes == g.chunk_bytes == 16 * 576 * 2
    assert g.page_bytes == 61 * 16 * 576 * 2


def test_fp8_and_fp32_item_sizes() -> None:
    assert KVGeometry(1, 1, 4, 1, "fp8").page_bytes == 2 * 4
    assert KVGeometry(1, 1, 4, 1, "float32").page_bytes == 2 * 4 * 4


@pytest.mark.parametrize("field", ["num_layers", "num_kv_heads", "head_size", "page_size"])
@pytest.mark.parametrize("value", [0, -3, True, 1.5, "8"])
def test_bad_sizes_name_the_field(field: str, value: object) -> None:
    kwargs: dict[str, object] = {"num_layers": 2, "num_kv_heads": 2, "head_size": 8, "page_size": 4}
    kwargs[field] = value
    with pytest.raises(ConfigError) as err:
        KVGeometry(**kwargs)  # type: ignore[arg-type]
    assert err.value.field == field
    assert field in str(err.value)


def test_bad_dtype_mla_heads_and_unknown_names() -> None:
    with pytest.raises(ConfigError) as err:
        KVGeometry(2, 2, 8, 4, dtype="int4")
    assert err.value.field == "dtype" and "bfloat16" in str(err.value)
    with pytest.raises(ConfigError) as err:
        KVGeometry(2, 2, 8, 4, mla=True)
    assert err.value.field == "num_kv_heads"
    with pytest.raises(ConfigError) as err:
        KVGeometry.from_dict({"num_layers": 2, "num_kv_heads": 2, "head_size": 8, "page_sz": 4})
    assert err.value.field == "geometry.page_sz"
    with pytest.raises(ConfigError) as err:
        preset("llama-9000")
    assert err.value.field == "geometry" and "llama3-8b" in str(err.value)


def test_dtype_names_and_round_trip() -> None:
    assert canonical_dtype("bf16") == "bfloat16"
    assert canonical_dtype(torch.float16) == "float16"
    assert canonical_dtype("fp8") == "float8_e4m3fn"
    assert torch_dtype("fp8") is torch.float8_e4m3fn
    assert torch_dtype("fp32") is torch.float32
    for g in PRESETS.values():
        assert KVGeometry.from_dict(g.as_dict()) == g
    g = KVGeometry(2, 2, 8, 4, dtype=torch.bfloat16)  # type: ignore[arg-type]
    assert g.dtype == "bfloat16"
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.num_layers = 3  # type: ignore[misc]
