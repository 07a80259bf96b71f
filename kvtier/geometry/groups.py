"""KV cache groups: how a hybrid allocator lays a model's KV out over shared tensors.

An engine with a hybrid allocator (vLLM v1) puts layers with the same attention spec into
*groups* and backs them with a few *tensors*, each shared by one layer of every group. Block ids
come from one pool, so a block id is used by one group at a time and all layers sharing a tensor
address block `b` at `b * page_bytes` inside it. A model whose 34 layers share 5 tensors is the
usual case (29 sliding-window layers in six groups, 5 full-attention layers in one).

This module describes that layout (pure data, no torch); `kvtier.transfer.registration` turns it
plus the engine's real addresses into registered regions and per-block transfer descriptors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from kvtier.errors import ConfigError
from kvtier.geometry.spec import DTYPE_SIZES, canonical_dtype


class AttentionKind(StrEnum):
    FULL = "full_attention"
    SLIDING_WINDOW = "sliding_window"
    MLA = "mla_attention"


# vLLM's spec class names and short aliases accepted in config dicts.
_KIND_ALIASES = {
    "full": AttentionKind.FULL,
    "fullattentionspec": AttentionKind.FULL,
    "sliding": AttentionKind.SLIDING_WINDOW,
    "slidingwindowspec": AttentionKind.SLIDING_WINDOW,
    "mla": AttentionKind.MLA,
    "mlaattentionspec": AttentionKind.MLA,
}


def attention_kind(value: object) -> AttentionKind:
    """Parse an AttentionKind from its value, a short alias or a vLLM spec class name."""
    if isinstance(value, AttentionKind):
        return value
    text = str(value).lower()
    for kind in AttentionKind:
        if text == kind.value:
            return kind
    if text in _KIND_ALIASES:
        return _KIND_ALIASES[text]
    raise ConfigError("kv_cache_spec.type", value, [k.value for k in AttentionKind])


def _positive(field: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(field, value, "a positive integer")


@dataclass(frozen=True)
class AttentionGroup:
    """Layers that share one attention spec and one block table.

    `page_size` is tokens per block. For MLA there is one latent per token (`num_kv_heads` 1,
    `head_size` the latent width) instead of K and V.
    """

    kind: AttentionKind
    layers: tuple[str, ...]
    num_kv_heads: int
    head_size: int
    page_size: int
    dtype: str = "bfloat16"
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", attention_kind(self.kind))
        object.__setattr__(self, "layers", tuple(str(n) for n in self.layers))
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        if not self.layers:
            raise ConfigError("group.layers", self.layers, "at least one layer name")
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError("group.layers", self.layers, "distinct layer names")
        _positive("group.num_kv_heads", self.num_kv_heads)
        _positive("group.head_size", self.head_size)
        _positive("group.page_size", self.page_size)
        if self.kind is AttentionKind.SLIDING_WINDOW:
            _positive("group.sliding_window", self.sliding_window)
        elif self.sliding_window is not None:
            raise ConfigError("group.sliding_window", self.sliding_window, "None unless sliding")
        if self.kind is AttentionKind.MLA and self.num_kv_heads != 1:
            raise ConfigError("group.num_kv_heads", self.num_kv_heads, "1 for MLA (one latent)")

    @property
    def kv_factor(self) -> int:
        return 1 if self.kind is AttentionKind.MLA else 2

    @property
    def block_bytes(self) -> int:
        """Bytes one block of one layer of this group occupies in its tensor (K and V)."""
        itemsize = DTYPE_SIZES[self.dtype]
        return self.kv_factor * self.page_size * self.num_kv_heads * self.head_size * itemsize


@dataclass(frozen=True)
class KVTensorSpec:
    """One engine tensor of `size_bytes`, shared by `layers` (at most one per group).

    `kv_split` marks the `[2][num_blocks][...]` layout (K of every block, then V of every block,
    as FlashAttention keeps it): a block is then two runs of half the block bytes.
    """

    name: str
    size_bytes: int
    layers: tuple[str, ...]
    kv_split: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(str(n) for n in self.layers))
        _positive(f"tensor[{self.name}].size_bytes", self.size_bytes)
        if not self.layers:
            raise ConfigError(f"tensor[{self.name}].layers", self.layers, "at least one layer")


@dataclass(frozen=True)
class KVCacheSpec:
    """The whole KV cache: groups, the tensors backing them, and blocks per tensor."""

    groups: tuple[AttentionGroup, ...]
    tensors: tuple[KVTensorSpec, ...]
    num_blocks: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(self.groups))
        object.__setattr__(self, "tensors", tuple(self.tensors))
        _positive("num_blocks", self.num_blocks)
        if not self.groups:
            raise ConfigError("kv_cache_groups", [], "at least one group")
        layer_group: dict[str, int] = {}
        for gi, group in enumerate(self.groups):
            for layer in group.layers:
                if layer in layer_group:
                    raise ConfigError(
                        f"kv_cache_groups[{gi}].layers", layer,
                        f"a layer in one group only (already in group {layer_group[layer]})",
                    )
                layer_group[layer] = gi
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise ConfigError("kv_cache_tensors.name", names, "distinct tensor names")
        seen: dict[str, str] = {}
        for tensor in self.tensors:
            block_bytes: set[int] = set()
            for layer in tensor.layers:
                if layer not in layer_group:
                    raise ConfigError(
                        f"tensor[{tensor.name}].shared_by", layer, "a layer of a group"
                    )
                if layer in seen:
                    raise ConfigError(
                        f"tensor[{tensor.name}].shared_by", layer,
                        f"a layer backed by one tensor only (also in {seen[layer]})",
                    )
                seen[layer] = tensor.name
                group = self.groups[layer_group[layer]]
                block_bytes.add(group.block_bytes)
                if tensor.kv_split and group.kind is AttentionKind.MLA:
                    raise ConfigError(f"tensor[{tensor.name}].kv_split", True, "False for MLA")
            if len(block_bytes) != 1:
                raise ConfigError(
                    f"tensor[{tensor.name}]", sorted(block_bytes),
                    "one page size in bytes for every layer sharing a tensor",
                )
            need = self.num_blocks * block_bytes.pop()
            if tensor.size_bytes < need:
                raise ConfigError(
                    f"tensor[{tensor.name}].size_bytes", tensor.size_bytes,
                    f">= num_blocks * block bytes = {need}",
                )
        for layer in layer_group:
            if layer not in seen:
                raise ConfigError("kv_cache_tensors", layer, "a tensor for every layer")

    def group_of_layer(self, layer: str) -> int:
        for gi, group in enumerate(self.groups):
            if layer in group.layers:
                return gi
        raise KeyError(layer)

    def tensor_of_layer(self, layer: str) -> KVTensorSpec:
        for tensor in self.tensors:
            if layer in tensor.layers:
                return tensor
        raise KeyError(layer)

    def layers_of_tensor(self, name: str) -> tuple[str, ...]:
        for tensor in self.tensors:
            if tensor.name == name:
                return tensor.layers
        raise KeyError(name)

    def tensors_of_group(self, group: int) -> tuple[KVTensorSpec, ...]:
        """The distinct tensors a group's blocks live in, in spec order."""
        layers = set(self.groups[group].layers)
        return tuple(t for t in self.tensors if layers.intersection(t.layers))

    def block_bytes(self, group: int) -> int:
        """Bytes of one block of one layer of `group`."""
        return self.groups[group].block_bytes

    def request_block_bytes(self, group: int) -> int:
        """Bytes one block id of `group` moves: one block in each tensor of the group."""
        return self.block_bytes(group) * len(self.tensors_of_group(group))

    def as_dict(self) -> dict[str, object]:
        """The vLLM KVCacheConfig-like dict that `from_dict` reads back."""
        return {
            "num_blocks": self.num_blocks,
            "kv_cache_tensors": [
                {"name": t.name, "size": t.size_bytes, "shared_by": list(t.layers),
                 "kv_split": t.kv_split}
                for t in self.tensors
            ],
            "kv_cache_groups": [
                {"layer_names": list(g.layers), "kv_cache_spec": {
                    "type": g.kind.value, "block_size": g.page_size,
                    "num_kv_heads": g.num_kv_heads, "head_size": g.head_size,
                    "dtype": g.dtype, "sliding_window": g.sliding_window}}
                for g in self.groups
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> KVCacheSpec:
        """Build from a dict shaped like vLLM's KVCacheConfig (see `as_dict`)."""
        raw: Any = data
        try:
            groups = []
            for g in raw["kv_cache_groups"]:
                s = g["kv_cache_spec"]
                groups.append(AttentionGroup(
                    kind=attention_kind(s.get("type", "full_attention")),
                    layers=tuple(g["layer_names"]), num_kv_heads=s["num_kv_heads"],
                    head_size=s["head_size"], page_size=s["block_size"],
                    dtype=s.get("dtype", "bfloat16"), sliding_window=s.get("sliding_window"),
                ))
            tensors = [
                KVTensorSpec(name=str(t.get("name", f"kv{i}")), size_bytes=t["size"],
                             layers=tuple(t["shared_by"]), kv_split=bool(t.get("kv_split", False)))
                for i, t in enumerate(raw["kv_cache_tensors"])
            ]
            return cls(tuple(groups), tuple(tensors), raw["num_blocks"])
        except (KeyError, TypeError, AttributeError) as exc:
            raise ConfigError("kv_cache_config", exc, "a KVCacheConfig-like dict") from exc

    @classmethod
    def from_vllm(cls, config: object) -> KVCacheSpec:
        """Read a vLLM v1 KVCacheConfig object by attribute (vLLM is not imported here)."""
        cfg: Any = config
        groups = []
        for g in cfg.kv_cache_groups:
            s = g.kv_cache_spec
            name = type(s).__name__.lower()
            groups.append({"layer_names": list(g.layer_names), "kv_cache_spec": {
                "type": name, "block_size": s.block_size, "num_kv_heads": s.num_kv_heads,
                "head_size": s.head_size, "dtype": str(s.dtype),
                "sliding_window": getattr(s, "sliding_window", None)
                if "sliding" in name else None}})
        tensors = [{"name": f"kv{i}", "size": t.size, "shared_by": list(t.shared_by)}
                   for i, t in enumerate(cfg.kv_cache_tensors)]
        return cls.from_dict({"num_blocks": cfg.num_blocks,
                              "kv_cache_groups": groups, "kv_cache_tensors": tensors})


def uniform_spec(
    layer_kinds: Sequence[AttentionKind | str],
    num_kv_heads: int,
    head_size: int,
    page_size: int,
    num_blocks: int,
    dtype: str = "bfloat16",
    sliding_window: int | None = None,
    kv_split: bool = False,
) -> KVCacheSpec:
    """Lay layers out the way a hybrid allocator with one page size does.

    Layers of each kind are cut into groups of `n` layers, `n` the smallest per-kind count, and
    tensor `i` is shared by the `i`-th layer of every group. With a single kind this is the plain
    model: one group, one tensor per layer.
    """
    kinds = [attention_kind(k) for k in layer_kinds]
    by_kind: dict[AttentionKind, list[str]] = {}
    for i, kind in enumerate(kinds):
        by_kind.setdefault(kind, []).append(f"layer.{i}")
    if not by_kind:
        raise ConfigError("layer_kinds", layer_kinds, "at least one layer")
    n = min(len(v) for v in by_kind.values())
    groups: list[AttentionGroup] = []
    for kind, names in by_kind.items():
        for start in range(0, len(names), n):
            groups.append(AttentionGroup(
                kind, tuple(names[start:start + n]), num_kv_heads, head_size, page_size, dtype,
                sliding_window if kind is AttentionKind.SLIDING_WINDOW else None,
            ))
    block = groups[0].block_bytes
    tensors = tuple(
        KVTensorSpec(f"kv{i}", num_blocks * block,
                     tuple(g.layers[i] for g in groups if i < len(g.layers)), kv_split)
        for i in range(n)
    )
    return KVCacheSpec(tuple(groups), tensors, num_blocks)
