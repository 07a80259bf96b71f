"""KV geometry: the shape of one model's KV cache, independent of where it lives.

A *page* is `page_size` consecutive tokens of every layer's K and V (or the MLA latent). The page
is the unit of allocation, hashing, transfer and storage everywhere below the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvtier.errors import ConfigError

if TYPE_CHECKING:
    import torch

# Canonical dtype names -> bytes per element. Names are strings so that keys, configs and the
# namespace fingerprint never depend on a torch build.
DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}
_DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp8": "float8_e4m3fn",
    "fp8_e4m3": "float8_e4m3fn",
    "float8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
}


def canonical_dtype(name: object) -> str:
    """Return the canonical dtype name for a string or torch dtype; raise ConfigError otherwise."""
    text = str(name)
    if text.startswith("torch."):
        text = text[len("torch.") :]
    text = _DTYPE_ALIASES.get(text, text)
    if text not in DTYPE_SIZES:
        raise ConfigError("dtype", name, sorted(DTYPE_SIZES))
    return text


def torch_dtype(name: str) -> torch.dtype:
    import torch

    dtype: torch.dtype = getattr(torch, canonical_dtype(name))
    return dtype


def _positive(field: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(field, value, "a positive integer")


@dataclass(frozen=True)
class KVGeometry:
    """The KV shape of one model shard (one TP rank).

    `num_kv_heads` is the number of KV heads this rank holds. For MLA (`mla=True`) there is one
    latent buffer per layer instead of K and V: `num_kv_heads` must be 1 and `head_size` is the
    latent width (kv_lora_rank + rope dim).
    """

    num_layers: int
    num_kv_heads: int
    head_size: int
    page_size: int
    dtype: str = "bfloat16"
    mla: bool = False

    def __post_init__(self) -> None:
        _positive("num_layers", self.num_layers)
        _positive("num_kv_heads", self.num_kv_heads)
        _positive("head_size", self.head_size)
        _positive("page_size", self.page_size)
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        if self.mla and self.num_kv_heads != 1:
            raise ConfigError("num_kv_heads", self.num_kv_heads, "1 when mla=True (one latent)")

    @property
    def kv_factor(self) -> int:
        """2 for separate K and V, 1 for the MLA latent."""
        return 1 if self.mla else 2

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def token_bytes_per_layer(self) -> int:
        """Bytes of one token of one layer, K and V together."""
        return self.kv_factor * self.num_kv_heads * self.head_size * self.itemsize

    @property
    def chunk_bytes(self) -> int:
        """Bytes of one page of one layer of K (or V, or the latent): the smallest contiguous
        run in a layer-first device tensor."""
        return self.page_size * self.num_kv_heads * self.head_size * self.itemsize

    @property
    def layer_page_bytes(self) -> int:
        """Bytes of one page of one layer, K and V together."""
        return self.kv_factor * self.chunk_bytes

    @property
    def page_bytes(self) -> int:
        """Bytes of one whole page (all layers): the payload of one page blob."""
        return self.num_layers * self.layer_page_bytes

    @property
    def page_elems(self) -> int:
        return self.page_bytes // self.itemsize

    def as_dict(self) -> dict[str, object]:
        return {
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_size": self.head_size,
            "page_size": self.page_size,
            "dtype": self.dtype,
            "mla": self.mla,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> KVGeometry:
        allowed = {"num_layers", "num_kv_heads", "head_size", "page_size", "dtype", "mla"}
        for name in data:
            if name not in allowed:
                raise ConfigError(f"geometry.{name}", data[name], f"a field of {sorted(allowed)}")
        return cls(**data)  # type: ignore[arg-type]


# Named geometries used by benchmarks and the CLI (`--geometry llama3-8b`).
PRESETS: dict[str, KVGeometry] = {
    "llama3-8b": KVGeometry(32, 8, 128, 16, "bfloat16"),
    "llama3-70b-tp4": KVGeometry(80, 2, 128, 16, "bfloat16"),
    "deepseek-v3-mla": KVGeometry(61, 1, 576, 16, "bfloat16", mla=True),
    "tiny": KVGeometry(2, 2, 32, 16, "float32"),
}


def preset(name: str) -> KVGeometry:
    if name not in PRESETS:
        raise ConfigError("geometry", name, sorted(PRESETS))
    return PRESETS[name]
