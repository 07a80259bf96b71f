"""kvtier inside vLLM (0.32+): an out-of-tree OffloadingSpec, a cache-policy adapter and the
`--kv-transfer-config` that turns them on.

vLLM's OffloadingConnector loads `KVTierOffloadingSpec` by module path. Its scheduler-side
manager is kvtier's TieredCache (host memory + the configured tier chain); its worker-side
transfer worker is kvtier's CopyEngine (CUDA paths on GPUs, the torch path on CPUs). Both sides
share the host page pool through a shared-memory file named after the engine.

Importing this package does not import vLLM: `kv_transfer_config` only builds a JSON document.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

SPEC_NAME = "KVTierOffloadingSpec"
SPEC_MODULE = "kvtier.integrations.vllm.spec"
POLICY_MODULE = "kvtier.integrations.vllm.policy"


def kv_transfer_config(
    config: Mapping[str, Any] | str | os.PathLike[str] | None = None,
    *,
    run_id: str | None = None,
    block_size: int | None = None,
    stats_path: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """The `--kv-transfer-config` (or `LLM(kv_transfer_config=...)`) document for kvtier.

    `config`: a kvtier cache config (mapping, or path of a YAML file the engine reads at start);
    None uses kvtier's embedded default (host memory + a local disk directory).
    `block_size`: tokens per offloaded page, a multiple of vLLM's block size (default: one
    vLLM block per page). `run_id` names the shared host pool (default: vLLM's engine id).
    `stats_path`: the engine keeps kvtier's counters there as JSON (read by `kvtier demo`).
    """
    extra: dict[str, Any] = {"spec_name": SPEC_NAME, "spec_module_path": SPEC_MODULE}
    if config is not None:
        extra["kvtier_config"] = (
            dict(config) if isinstance(config, Mapping) else str(os.fspath(config))
        )
    if run_id is not None:
        extra["kvtier_run_id"] = run_id
    if block_size is not None:
        extra["block_size"] = int(block_size)
    if stats_path is not None:
        extra["kvtier_stats_path"] = str(os.fspath(stats_path))
    return {
        "kv_connector": "OffloadingConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": extra,
    }


__all__ = ["POLICY_MODULE", "SPEC_MODULE", "SPEC_NAME", "kv_transfer_config"]
