"""A tiny random Llama (and a hybrid sliding-window variant) built locally with transformers.

The end-to-end tests and `kvtier demo` need a real model that vLLM serves on a CPU in seconds.
Weights are random but fixed by a seed, so greedy decoding is deterministic and two runs (with
and without kvtier) must produce the same tokens. Prompts are token ids (no tokenizer needed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

TINY_LLAMA = {
    "num_hidden_layers": 2,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # head size 32: the smallest the CPU attention kernels take
    "vocab_size": 1024,
    "max_position_embeddings": 4096,
}


# Big enough that a prefill costs real time on a CPU (what kvtier saves), small enough to start
# in seconds: about 12M parameters.
DEMO_LLAMA = dict(
    TINY_LLAMA,
    num_hidden_layers=4,
    hidden_size=512,
    intermediate_size=1024,
    num_attention_heads=8,
    num_key_value_heads=2,  # head size 64
)


def default_model_dir() -> Path:
    base = os.environ.get("KVTIER_MODEL_DIR")
    if base:
        return Path(base)
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "kvtier" / "models"


def build_tiny_model(
    kind: str = "llama", directory: str | os.PathLike[str] | None = None, seed: int = 0
) -> Path:
    """Build (or reuse) the tiny random model `kind` and return its path: "llama" (2 layers,
    hidden 128), "demo" (4 layers, hidden 512) or "hybrid" (see below).

    "hybrid" is a 4-layer Llama whose layers alternate sliding-window (64 tokens) and full
    attention.
    """
    if kind not in ("llama", "demo", "hybrid"):
        from kvtier.errors import ConfigError

        raise ConfigError("model kind", kind, ["llama", "demo", "hybrid"])
    root = Path(directory) if directory is not None else default_model_dir()
    path = root / f"tiny-{kind}-s{seed}"
    marker = path / "kvtier-model.json"
    if marker.is_file():
        return path
    import torch
    import transformers

    torch.manual_seed(seed)
    params: dict[str, Any] = dict(DEMO_LLAMA if kind == "demo" else TINY_LLAMA)
    params["torch_dtype"] = "float32"
    if kind == "hybrid":
        # vLLM's Llama reads `layer_types`: two sliding-window layers and two full ones become
        # two KV-cache groups under the hybrid allocator.
        params.update(
            num_hidden_layers=4,
            sliding_window=64,
            layer_types=["sliding_attention", "full_attention"] * 2,
        )
    model: Any = transformers.LlamaForCausalLM(transformers.LlamaConfig(**params))
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / "kvtier-model.json").write_text(json.dumps({"kind": kind, "seed": seed}))
    try:
        tmp.rename(path)
    except OSError:  # another process built it meanwhile
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return path
