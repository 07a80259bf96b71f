"""What the scheduler-side manager and the worker-side transfer worker must agree on.

Both sides derive everything from vLLM's OffloadingConfig alone, so they agree without talking:
the page geometry (one kvtier page = one offloaded chunk of one KV-cache group = k vLLM blocks),
the key namespace, the payload size and the path of the shared host pool.

Page bytes. vLLM keeps each layer's block as one contiguous run. With the usual block-first
`[2][block_size][H][D]` block (CUDA, "NHD") a page is kvtier's canonical `[L][kv][S][H][D]` blob
with the heads flattened (`H = 1, D = H * D`, byte-identical). Other block layouts (vLLM-CPU's
`[H][2][block_size][D]`, CUDA "HND") are stored as they are; the namespace then names the layout
so that pages of different layouts never meet.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vllm.v1.kv_offload.base import LoadStoreSpec
from vllm.v1.kv_offload.config import OffloadingConfig

from kvtier.cache import CacheConfig
from kvtier.errors import ConfigError
from kvtier.geometry import KVGeometry, canonical_dtype
from kvtier.geometry.spec import DTYPE_SIZES
from kvtier.keys import Namespace
from kvtier.memory.host_pool import HostPool


class KVTierLoadStoreSpec(LoadStoreSpec):
    """Host slots of the pages of one transfer, in the order of the job's keys.

    `groups[i]` is the position (in OffloadingConfig.groups) of the KV-cache group page i
    belongs to: the worker splits a job per group with it. Plain lists: this travels from the
    scheduler to the workers inside vLLM's connector metadata.
    """

    def __init__(self, slots: Sequence[int], groups: Sequence[int]) -> None:
        if len(slots) != len(groups):
            raise ValueError("one group per slot")
        self.slots = [int(s) for s in slots]
        self.groups = [int(g) for g in groups]

    def __repr__(self) -> str:
        return f"KVTierLoadStoreSpec(slots={self.slots}, groups={self.groups})"


def block_layout(config: OffloadingConfig) -> str:
    """How one layer's block is laid out in memory ("NHD" is the canonical order)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return "cpu_hkvsd"  # [H][2][block_size][D]: K then V per head
    return (config.kv_cache_layout or "NHD").upper()


def max_group_layers(config: OffloadingConfig) -> int:
    return max(len(g.layer_names) for g in config.groups)


def tokens_per_page(config: OffloadingConfig) -> int:
    sizes = {g.tokens_per_block * config.cache.blocks_per_chunk for g in config.groups}
    if len(sizes) != 1:
        raise ConfigError(
            "kv_cache_groups.block_size", sorted(sizes), "one block size for every KV-cache group"
        )
    return sizes.pop()


def page_geometry(config: OffloadingConfig) -> KVGeometry:
    """Geometry of one page: the layers of the largest group, heads flattened into one."""
    if config.parallel.world_size != 1:
        raise ConfigError(
            "parallel.world_size", config.parallel.world_size,
            "1 (kvtier's vLLM plug-in does not split pages across TP/PP ranks yet)",
        )
    dtype = canonical_dtype(config.model.dtype)
    layers = max_group_layers(config)
    tokens_per_block = config.groups[0].tokens_per_block
    block_bytes = config.worker_kv_bytes_per_block
    denom = layers * 2 * tokens_per_block * DTYPE_SIZES[dtype]
    if block_bytes <= 0 or block_bytes % denom:
        raise ConfigError(
            "worker_kv_bytes_per_block", block_bytes,
            f"a positive multiple of layers * 2 * block_size * itemsize = {denom}",
        )
    return KVGeometry(layers, 1, block_bytes // denom, tokens_per_page(config), dtype)


def load_cache_config(config: OffloadingConfig) -> CacheConfig:
    return CacheConfig.load(config.extra_config.get("kvtier_config"))


def namespace(config: OffloadingConfig, cache_config: CacheConfig) -> Namespace:
    return Namespace(
        model_id=cache_config.model_id or config.model.name,
        geometry=page_geometry(config),
        tp_rank=config.parallel.rank,
        tp_size=config.parallel.world_size,
        extra=(("engine", "vllm"), ("block_layout", block_layout(config))),
    )


def pool_path(config: OffloadingConfig) -> Path:
    """The shared-memory file of the host pool: one per engine (run id and vLLM engine id)."""
    run_id = str(config.extra_config.get("kvtier_run_id") or "run")
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{run_id}-{config.engine_id}")[:160]
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / f"kvtier-vllm-{safe}.pool"


def open_pool(
    config: OffloadingConfig, cache_config: CacheConfig, *, pin: bool | None, wait_s: float = 60.0
) -> HostPool:
    """Open the engine's shared host pool; the manager and the worker size it the same way.

    Whoever comes first creates the file (O_EXCL decides); the second maps it and unlinks the
    name, so the memory goes back to the system when both processes are gone, however they
    end. (vLLM builds the worker before the scheduler; either order works.)
    """
    payload = page_geometry(config).page_bytes
    budget = cache_config.host.budget
    path = pool_path(config)
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    else:
        return HostPool.for_budget(budget, payload, pin=pin, shm_path=path)
    deadline = time.monotonic() + wait_s
    while True:  # the first opener may not have sized the file yet
        try:
            pool = HostPool.for_budget(budget, payload, pin=pin, shm_path=path, create=False)
            break
        except ConfigError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    remove_pool_file(config)
    return pool


def remove_pool_file(config: OffloadingConfig) -> None:
    with contextlib.suppress(OSError):
        os.unlink(pool_path(config))


def describe(config: OffloadingConfig) -> dict[str, Any]:
    """A short summary for logs."""
    g = page_geometry(config)
    return {
        "groups": len(config.groups),
        "layers_per_page": g.num_layers,
        "tokens_per_page": g.page_size,
        "page_bytes": g.page_bytes,
        "block_layout": block_layout(config),
        "pool": str(pool_path(config)),
    }
