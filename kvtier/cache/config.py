"""Cache configuration: one YAML file or dict naming the host tier and the ordered tier chain.

    model_id: my-model                 # optional when an integration supplies the namespace
    host:
      budget: 4GiB                     # bytes of page slots in host memory
      policy: lru                      # lru | arc | s3fifo
      shm_path: null                   # share the pool with worker processes through this file
      pin: auto                        # auto | true | false
    tiers:                             # ordered; lookups and promotion search them in order
      - kind: disk                     # disk | redis | valkey | mooncake | nixl
        name: disk                     # defaults to kind
        mode: write_through            # write_through: every stored page cascades here at once
                                       # demote: pages arrive when the host tier evicts them
        path: /var/tmp/kvtier          # every other key is the tier's own option
        budget: 50GiB
    promotion: {max_pages: 256}        # largest promotion batch started by one lookup
    headroom: 0.02                     # fraction of host slots kept free by demoting early
    segment: null                      # publish per-tier counters under this segment name
                                       # (KVTIER_RUN_DIR/stats/<segment>.json, for `kvtier top`)

Validation happens here and in each tier's factory; every error names the field.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvtier.errors import ConfigError
from kvtier.policy import POLICIES
from kvtier.units import parse_size

MODES = ("write_through", "demote")


@dataclass(frozen=True)
class HostConfig:
    budget: int = 1 << 30
    policy: str = "lru"
    shm_path: str | None = None
    pin: bool | None = None


@dataclass(frozen=True)
class TierConfig:
    kind: str
    name: str
    mode: str
    options: Mapping[str, Any]


@dataclass(frozen=True)
class CacheConfig:
    host: HostConfig = field(default_factory=HostConfig)
    tiers: tuple[TierConfig, ...] = ()
    model_id: str | None = None
    max_promotion_pages: int = 256
    headroom: float = 0.02
    segment: str | None = None

    @classmethod
    def load(
        cls, source: CacheConfig | Mapping[str, Any] | str | os.PathLike[str] | None
    ) -> CacheConfig:
        if source is None:
            return default_config()
        if isinstance(source, CacheConfig):
            return source
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.is_file():
                raise ConfigError("config", str(path), "a path to an existing YAML file")
            data = yaml.safe_load(path.read_text()) or {}
            if not isinstance(data, Mapping):
                raise ConfigError("config", str(path), "a YAML mapping at the top level")
            return parse_config(data)
        return parse_config(source)


def _check_keys(where: str, data: Mapping[str, Any], allowed: set[str]) -> None:
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{where}{key}", data[key], f"a known field: {sorted(allowed)}")


def parse_config(data: Mapping[str, Any]) -> CacheConfig:
    _check_keys("", data, {"model_id", "host", "tiers", "promotion", "headroom", "segment"})
    host_data = data.get("host") or {}
    if not isinstance(host_data, Mapping):
        raise ConfigError("host", host_data, "a mapping")
    _check_keys("host.", host_data, {"budget", "policy", "shm_path", "pin"})
    policy = str(host_data.get("policy", "lru"))
    if policy not in POLICIES:
        raise ConfigError("host.policy", policy, sorted(POLICIES))
    pin = host_data.get("pin", "auto")
    if pin not in ("auto", True, False, None):
        raise ConfigError("host.pin", pin, "auto, true or false")
    host = HostConfig(
        budget=parse_size(host_data.get("budget", "1GiB"), "host.budget"),
        policy=policy,
        shm_path=host_data.get("shm_path"),
        pin=None if pin in ("auto", None) else bool(pin),
    )
    tiers_data = data.get("tiers") or []
    if not isinstance(tiers_data, list):
        raise ConfigError("tiers", tiers_data, "a list of tier mappings")
    tiers: list[TierConfig] = []
    for i, item in enumerate(tiers_data):
        if not isinstance(item, Mapping) or "kind" not in item:
            raise ConfigError(f"tiers[{i}]", item, "a mapping with at least 'kind'")
        kind = str(item["kind"])
        name = str(item.get("name", kind))
        mode = str(item.get("mode", "write_through"))
        if mode not in MODES:
            raise ConfigError(f"tiers.{name}.mode", mode, MODES)
        if name == "host" or any(t.name == name for t in tiers):
            raise ConfigError(f"tiers[{i}].name", name, "a name no other tier uses (not 'host')")
        options = {k: v for k, v in item.items() if k not in ("kind", "name", "mode")}
        tiers.append(TierConfig(kind, name, mode, options))
    promo = data.get("promotion") or {}
    if not isinstance(promo, Mapping):
        raise ConfigError("promotion", promo, "a mapping")
    _check_keys("promotion.", promo, {"max_pages"})
    max_pages = promo.get("max_pages", 256)
    if not isinstance(max_pages, int) or max_pages < 1:
        raise ConfigError("promotion.max_pages", max_pages, "a positive integer")
    headroom = data.get("headroom", 0.02)
    if not isinstance(headroom, (int, float)) or not 0 <= headroom < 0.5:
        raise ConfigError("headroom", headroom, "a fraction in [0, 0.5)")
    model_id = data.get("model_id")
    segment = data.get("segment")
    if segment is not None and (not isinstance(segment, str) or not segment):
        raise ConfigError("segment", segment, "a segment name (letters, digits, '-', '_', '.')")
    return CacheConfig(
        host,
        tuple(tiers),
        None if model_id is None else str(model_id),
        max_pages,
        float(headroom),
        segment,
    )


def default_disk_path() -> Path:
    base = os.environ.get("KVTIER_DISK_DIR")
    if base:
        return Path(base)
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "kvtier" / "disk"


def default_config() -> CacheConfig:
    """The embedded default: host memory plus a local disk directory, no server needed."""
    return parse_config(
        {
            "host": {"budget": os.environ.get("KVTIER_HOST_BUDGET", "1GiB"), "policy": "lru"},
            "tiers": [
                {
                    "kind": "disk",
                    "path": str(default_disk_path()),
                    "budget": os.environ.get("KVTIER_DISK_BUDGET", "8GiB"),
                    "mode": "write_through",
                }
            ],
        }
    )
