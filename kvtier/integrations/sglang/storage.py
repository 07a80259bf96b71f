"""kvtier as an SGLang HiCache storage backend (L3), loaded by module path.

    python -m sglang.launch_server ... --enable-hierarchical-cache \\
        --hicache-mem-layout page_first_direct --hicache-storage-backend dynamic \\
        --hicache-storage-backend-extra-config '{"backend_name": "kvtier",
            "module_path": "kvtier.integrations.sglang.storage",
            "class_name": "KVTierStorage", "interface_v1": 1,
            "kvtier": {"tiers": [{"kind": "disk", "path": "/var/tmp/kvtier", "budget": "50GiB"}]}}'

SGLang's own host pool is the primary tier here: it alone touches the GPU, so this backend does
not build a TieredCache (that would keep a second host copy of every page). It drives kvtier's
secondary tiers directly, in config order: a lookup answers the consecutive prefix some tier
holds, a load reads each page from the first tier holding it (and copies pages found lower down
back into the first tier in the background), a store writes the first tier and every tier whose
mode is write_through. Between SGLang's pool and the tiers a page passes once through a staging
row (header + canonical payload, sealed with its checksum), since SGLang's pool has no room for
kvtier's blob header. Keys are SGLang's chained page hashes wrapped in kvtier's namespace.

MLA: the latent is identical on every TP rank, so all ranks share one namespace (tp 0/1) and
only the storage writer (`storage_config.is_storage_writer`) writes; the others report success.
"""

from __future__ import annotations

import builtins
import logging
import threading
from collections.abc import Mapping
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig

from kvtier.cache.config import CacheConfig
from kvtier.errors import ConfigError
from kvtier.integrations.sglang.chain import ChainTier, TierChain
from kvtier.integrations.sglang.pages import (
    PoolShape,
    native_flat_shape,
    page_view,
    payload_view,
    pool_shape,
)
from kvtier.keys import HEADER_SIZE, Namespace, PageKey, key_from_engine_hash, write_header
from kvtier.tiers.base import TierContext
from kvtier.tiers.registry import make_tier

log = logging.getLogger("kvtier.integrations.sglang")

STAGING_BYTES = 256 << 20  # staging rows per direction: enough for SGLang's 128-page batches


class _Staging:
    """Blob rows for one direction; one batch at a time (its lock)."""

    def __init__(self, rows: int, blob_bytes: int) -> None:
        self.lock = threading.Lock()
        self.rows = rows
        self.blob_bytes = blob_bytes
        self.buf = torch.empty(rows, blob_bytes, dtype=torch.uint8)

    def renew(self) -> None:
        # a timed-out job may still write the old rows: never reuse them
        self.buf = torch.empty(self.rows, self.blob_bytes, dtype=torch.uint8)

    def blob(self, i: int) -> memoryview:
        return memoryview(self.buf[i].numpy()).cast("B")  # type: ignore[arg-type]


class KVTierStorage(HiCacheStorage):
    """HiCache storage over kvtier's tier chain. Thread-safe; every tier fault is a miss."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Any = None) -> None:
        self.storage_config = storage_config
        extra = dict(storage_config.extra_config or {})
        self.config = CacheConfig.load(extra.get("kvtier"))
        self.model_id = extra.get("model_id") or self.config.model_id or storage_config.model_name
        if not self.model_id:
            raise ConfigError("model_id", self.model_id, "a model name (extra_config.model_id)")
        self.tenant = str(extra.get("tenant", ""))
        self.staging_bytes = int(extra.get("staging_bytes", STAGING_BYTES))
        self.timeout_s = float(extra.get("timeout_s", 30.0))
        self.is_mla = bool(storage_config.is_mla_model)
        self.is_writer = bool(storage_config.is_storage_writer)
        self.chain: TierChain | None = None
        self.shape: PoolShape | None = None
        self.namespace: Namespace | None = None

    # -- set-up --------------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        if self.chain is not None:  # registered again (a new pool): start over
            self.chain.close()
        self.shape = pool_shape(mem_pool_host, mla=self.is_mla)
        cfg = self.storage_config
        extra: tuple[tuple[str, str], ...] = ()
        if cfg.pp_size > 1:  # each pipeline stage holds its own layers
            extra = (("pp", f"{cfg.pp_rank}/{cfg.pp_size}"),)
        tp_rank, tp_size = (0, 1) if self.is_mla else (cfg.tp_rank, cfg.tp_size)
        self.namespace = Namespace(
            self.model_id, self.shape.geometry, tp_rank, tp_size, self.tenant, extra=extra
        )
        ctx = TierContext(self.namespace.fingerprint, self.shape.geometry.page_bytes)
        if not self.config.tiers:
            raise ConfigError("kvtier.tiers", [], "at least one tier below SGLang's host pool")
        tiers = [
            ChainTier(make_tier(t.kind, t.name, self._tier_options(t.kind, t.name, t.options),
                                ctx), t.mode == "write_through")
            for t in self.config.tiers
        ]
        self.chain = TierChain(tiers, timeout_s=self.timeout_s)
        rows = max(1, self.staging_bytes // ctx.blob_bytes)
        self._load_stage = _Staging(rows, ctx.blob_bytes)
        self._store_stage = _Staging(rows, ctx.blob_bytes)

    def _tier_options(self, kind: str, name: str, options: Mapping[str, Any]) -> dict[str, Any]:
        """MLA ranks share one namespace and only the storage writer stores: every other rank
        serves a disk tier's directory as a reader (no lock, rescans for the writer's pages)."""
        if not self.is_mla or self.is_writer:
            return dict(options)
        if kind == "disk":
            return {**options, "reader": True}
        if kind == "nixl":
            raise ConfigError(f"tiers.{name}.kind", kind,
                              "disk, redis, valkey or mooncake for an MLA model with several "
                              "ranks (a nixl tier's slab files take one process)")
        return dict(options)

    def _ready(self) -> tuple[TierChain, PoolShape, Namespace]:
        if self.chain is None or self.shape is None or self.namespace is None:
            raise RuntimeError("register_mem_pool_host was not called")
        return self.chain, self.shape, self.namespace

    def _keys(self, hashes: list[str]) -> list[PageKey]:
        ns = self._ready()[2]
        return [key_from_engine_hash(ns, h) for h in hashes]

    # -- lookups -------------------------------------------------------------------------------
    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        chain = self._ready()[0]
        return chain.prefix_hits(self._keys(keys))

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    # -- zero-copy interface (host indices) -------------------------------------------------------
    def batch_get_v1(
        self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None
    ) -> list[bool]:
        _, shape, _ = self._ready()
        s = shape.geometry.page_size
        idx = host_indices.tolist()
        views = [
            page_view(self.mem_pool_host.kv_buffer, shape, idx[i * s]) for i in range(len(keys))
        ]
        return self._get_pages(self._keys(keys), views)

    def batch_set_v1(
        self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None
    ) -> list[bool]:
        if self.is_mla and not self.is_writer:
            return [True] * len(keys)
        _, shape, _ = self._ready()
        s = shape.geometry.page_size
        idx = host_indices.tolist()
        views = [
            page_view(self.mem_pool_host.kv_buffer, shape, idx[i * s]) for i in range(len(keys))
        ]
        return self._set_pages(self._keys(keys), views)

    # -- tensor interface (flat pages in the pool's own order) -----------------------------------
    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> Any:
        out = self.batch_get([key], [target_location])
        return out[0]

    def batch_get(
        self, keys: list[str], target_locations: Any = None, target_sizes: Any = None
    ) -> list[torch.Tensor | None]:
        _, shape, _ = self._ready()
        native, to_canon = native_flat_shape(shape)
        targets = list(target_locations or [None] * len(keys))
        for i, t in enumerate(targets):
            if t is None:
                targets[i] = self.mem_pool_host.get_dummy_flat_data_page()
        views = [to_canon(t.view(native)) for t in targets]
        ok = self._get_pages(self._keys(keys), views)
        return [t if good else None for t, good in zip(targets, ok)]

    def set(
        self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None
    ) -> bool:
        return self.batch_set([key], [value])

    def batch_set(
        self,
        keys: list[str],
        values: Any = None,
        target_locations: Any = None,
        target_sizes: Any = None,
    ) -> bool:
        if self.is_mla and not self.is_writer:
            return True
        _, shape, _ = self._ready()
        native, to_canon = native_flat_shape(shape)
        views = [to_canon(v.reshape(native)) for v in values]
        return all(self._set_pages(self._keys(keys), views))

    # -- the work ------------------------------------------------------------------------------
    def _get_pages(self, keys: list[PageKey], dests: list[torch.Tensor]) -> list[bool]:
        """Load pages into `dests` (canonical-order views); ok for the leading pages that
        loaded, False from the first failure on (SGLang only uses a prefix)."""
        chain, shape, _ = self._ready()
        stage = self._load_stage
        ok = [False] * len(keys)
        where = chain.locate(keys)
        n = where.index(None) if None in where else len(where)
        with stage.lock:
            for start in range(0, n, stage.rows):
                end = min(n, start + stage.rows)
                got = self._load_chunk(chain, stage, keys, where, start, end)
                for i in range(start, end):
                    if keys[i] not in got:
                        return ok
                    row = stage.buf[i - start]
                    dests[i].copy_(payload_view(row, shape, HEADER_SIZE))
                    ok[i] = True
        return ok

    def _load_chunk(
        self,
        chain: TierChain,
        stage: _Staging,
        keys: list[PageKey],
        where: list[int | None],
        start: int,
        end: int,
    ) -> builtins.set[PageKey]:
        got: builtins.set[PageKey] = builtins.set()
        by_tier: dict[int, list[int]] = {}
        for i in range(start, end):
            by_tier.setdefault(where[i] or 0, []).append(i)
        for t, idx in sorted(by_tier.items()):
            items = [(keys[i], stage.blob(i - start)) for i in idx]
            before = chain.timeouts
            loaded = chain.load(t, items)
            if chain.timeouts != before:
                stage.renew()
            got |= loaded
            if t > 0 and loaded:  # copy up into the first tier, from buffers it may keep
                up = [(k, memoryview(bytearray(b))) for k, b in items if k in loaded]
                chain.store_detached(0, up)
        return got

    def _set_pages(self, keys: list[PageKey], srcs: list[torch.Tensor]) -> list[bool]:
        chain, shape, ns = self._ready()
        stage = self._store_stage
        g = shape.geometry
        ok = [False] * len(keys)
        with stage.lock:
            for start in range(0, len(keys), stage.rows):
                end = min(len(keys), start + stage.rows)
                items = []
                for i in range(start, end):
                    row = stage.buf[i - start]
                    payload_view(row, shape, HEADER_SIZE).copy_(srcs[i])
                    blob = stage.blob(i - start)
                    write_header(blob, ns.fingerprint, keys[i], g.page_bytes, seal=True)
                    items.append((keys[i], blob[: HEADER_SIZE + g.page_bytes]))
                before = chain.timeouts
                stored = chain.store(0, items)
                for t in range(1, len(chain)):
                    if chain.tiers[t].write_through:
                        chain.store(t, items)
                if chain.timeouts != before:
                    stage.renew()
                for i in range(start, end):
                    ok[i] = keys[i] in stored
        return ok

    # -- housekeeping --------------------------------------------------------------------------
    def clear(self) -> None:
        if self.chain is not None:
            for ct in self.chain.tiers:
                log.info("kvtier storage clear: tier %s keeps its pages", ct.tier.name)

    def get_stats(self) -> Any:
        return None

    def tier_stats(self) -> Mapping[str, Any]:
        """kvtier's per-tier counters (SGLang's metrics object has its own shape)."""
        if self.chain is None:
            return {}
        return {ct.tier.name: ct.tier.stats() for ct in self.chain.tiers}

    def close(self) -> None:
        if self.chain is not None:
            self.chain.close()
            self.chain = None
