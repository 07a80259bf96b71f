"""`KVTierOffloadingSpec`: what vLLM's OffloadingConnector loads by module path.

    kv_transfer_config = {
        "kv_connector": "OffloadingConnector", "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "spec_name": "KVTierOffloadingSpec",
            "spec_module_path": "kvtier.integrations.vllm.spec",
            "kvtier_config": {...} or "/path/to/kvtier.yaml",   # optional: embedded default
            "block_size": 64,          # optional: tokens per kvtier page (k vLLM blocks)
            "kvtier_run_id": "...",    # optional: names the shared host pool file
            "kvtier_stats_path": "...",  # optional: the manager keeps its counters here (JSON)
        }}

(`kvtier vllm-args` prints it.) The scheduler process builds the manager (a TieredCache), each
worker process the transfer worker (CopyEngines); they share the host pool through a file in
/dev/shm named after the run id (vLLM's engine id by default).
"""

from __future__ import annotations

import logging

from vllm.v1.kv_offload.base import (
    CanonicalKVCaches,
    OffloadingManager,
    OffloadingSpec,
    OffloadingWorker,
)
from vllm.v1.kv_offload.config import OffloadingConfig

from kvtier.cache import TieredCache
from kvtier.integrations.vllm import common
from kvtier.integrations.vllm.manager import KVTierOffloadingManager

log = logging.getLogger("kvtier.vllm")


class KVTierOffloadingSpec(OffloadingSpec):
    """Builds the manager (scheduler side) and the worker (worker side) once each.

    Raises kvtier.errors.ConfigError at engine start for a bad kvtier config, a page geometry
    kvtier cannot express, or a multi-rank engine (not supported yet).
    """

    def __init__(self, config: OffloadingConfig) -> None:
        super().__init__(config)
        self.cache_config = common.load_cache_config(config)
        self._manager: KVTierOffloadingManager | None = None
        self._worker: OffloadingWorker | None = None

    def get_manager(self) -> OffloadingManager:
        if self._manager is None:
            cfg = self.config
            ns = common.namespace(cfg, self.cache_config)
            pool = common.open_pool(cfg, self.cache_config, pin=False)
            cache = TieredCache(self.cache_config, ns, host_pool=pool)
            self._manager = KVTierOffloadingManager(
                cache,
                ns,
                {g.group_id: i for i, g in enumerate(cfg.groups)},
                tier_kinds={t.name: t.kind for t in self.cache_config.tiers},
                emit_events=self.kv_events_config.enable_kv_cache_events,
                stats_path=cfg.extra_config.get("kvtier_stats_path"),
                on_close=lambda: common.remove_pool_file(cfg),
            )
            log.info("kvtier offloading manager: %s", common.describe(cfg))
        return self._manager

    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        if self._worker is None:
            from kvtier.integrations.vllm.worker import KVTierOffloadingWorker

            cfg = self.config
            pool = common.open_pool(cfg, self.cache_config, pin=None)
            self._worker = KVTierOffloadingWorker(
                kv_caches,
                pool,
                common.page_geometry(cfg),
                cfg.groups[0].tokens_per_block,
                canonical=common.block_layout(cfg) == "NHD",
            )
        return self._worker
