"""Path-choice thresholds of the copy engine, measured on the GPU and committed as JSON.

`thresholds.json` (next to this file) is written by the threshold sweep of
`bench/device/transfer.sh`. For each direction it holds rules, tried in order:
`{"max_items": M, "dma_min_item_bytes": B}` means "for a job of at most M items (None: any
count), use batched DMA when an item (one contiguous run) is at least B bytes (None: never),
else the Triton kernel". `triton` holds the kernel's tile (bytes per program), warps, and
`ctas_per_sm`: the copy grid is at most that many programs per SM (0: one program per tile).
A bounded grid lets a store and a load kernel be resident at once (see triton_kernels).
`staged` configures the staged DMA path (kvtier.transfer.staged): "auto" takes it for jobs of at
least `min_job_bytes` whose contiguous host run per page is at least `min_run_bytes`, with
`buffers` staging buffers of `chunk_bytes` per direction; `batch` issues each chunk's copies as
one cuMemcpyBatchAsync call instead of one cuMemcpyAsync per run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kvtier.errors import ConfigError

DEFAULT_PATH = Path(__file__).with_name("thresholds.json")
# 4 programs of 4 warps per SM: a quarter of an H100 SM's warp slots, so two copies (a store and
# a load) fit side by side, while 4 x 132 tiles of 8-16 KiB in flight still cover PCIe latency.
DEFAULT_CTAS_PER_SM = 4


@dataclass(frozen=True)
class Rule:
    max_items: int | None
    dma_min_item_bytes: int | None


@dataclass(frozen=True)
class Staged:
    min_job_bytes: int = 64 << 20
    min_run_bytes: int = 256 << 10
    chunk_bytes: int = 32 << 20
    buffers: int = 2
    batch: bool = False

    @classmethod
    def from_dict(cls, raw: object) -> Staged:
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ConfigError("thresholds.staged", raw, "an object")
        out = cls(**{k: raw[k] for k in raw if k in cls.__dataclass_fields__})
        for name in ("min_job_bytes", "min_run_bytes", "chunk_bytes", "buffers"):
            v = getattr(out, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name == "buffers" else 0):
                raise ConfigError(f"thresholds.staged.{name}", v, "a non-negative integer")
        if not isinstance(out.batch, bool):
            raise ConfigError("thresholds.staged.batch", out.batch, "true or false")
        return out


@dataclass(frozen=True)
class Thresholds:
    store: tuple[Rule, ...]
    load: tuple[Rule, ...]
    triton_block_bytes: int = 16384
    triton_num_warps: int = 4
    measured: bool = False
    triton_ctas_per_sm: int = DEFAULT_CTAS_PER_SM
    staged: Staged = Staged()

    def use_dma(self, op: str, item_bytes: int, items: int) -> bool:
        """True when batched DMA should move `items` runs of `item_bytes` for `op`."""
        for rule in self.store if op == "store" else self.load:
            if rule.max_items is None or items <= rule.max_items:
                limit = rule.dma_min_item_bytes
                return limit is not None and item_bytes >= limit
        return False

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Thresholds:
        def rules(name: str) -> tuple[Rule, ...]:
            raw = data.get(name, [])
            if not isinstance(raw, list):
                raise ConfigError(f"thresholds.{name}", raw, "a list of rules")
            return tuple(Rule(r.get("max_items"), r.get("dma_min_item_bytes")) for r in raw)

        triton = data.get("triton") or {}
        if not isinstance(triton, dict):
            raise ConfigError("thresholds.triton", triton, "an object")
        block = int(triton.get("block_bytes", 16384))
        if block <= 0 or block & (block - 1):
            raise ConfigError("thresholds.triton.block_bytes", block, "a power of two")
        ctas = triton.get("ctas_per_sm", DEFAULT_CTAS_PER_SM)
        if not isinstance(ctas, int) or ctas < 0:
            raise ConfigError("thresholds.triton.ctas_per_sm", ctas, "an integer >= 0")
        return cls(
            rules("store"),
            rules("load"),
            block,
            int(triton.get("num_warps", 4)),
            bool(data.get("measured", False)),
            ctas,
            Staged.from_dict(data.get("staged")),
        )

    @classmethod
    def read(cls, path: str | Path | None = None) -> Thresholds:
        """Thresholds from `path` (default: the committed thresholds.json)."""
        p = Path(path) if path is not None else DEFAULT_PATH
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError("thresholds", str(p), f"a readable JSON file ({exc})") from None
        return cls.from_dict(data)
