"""Key namespaces: the fingerprint that keeps KV of one model/geometry/TP/tenant apart.

The fingerprint is a 16-byte BLAKE2b digest of a canonical JSON document, so it is identical
across processes, hosts and Python versions (never Python's `hash()`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from kvtier.errors import ConfigError
from kvtier.geometry import KVGeometry

FINGERPRINT_BYTES = 16
KEY_BYTES = 16


@dataclass(frozen=True)
class Namespace:
    """Everything that must match for stored KV to be valid for a reader.

    `layout_version` is bumped whenever kvtier changes the canonical page layout. `tenant` is an
    optional salt: caches of different tenants never share pages, even for the same prompt.
    """

    model_id: str
    geometry: KVGeometry
    tp_rank: int = 0
    tp_size: int = 1
    tenant: str = ""
    layout_version: int = 1
    extra: tuple[tuple[str, str], ...] = ()
    fingerprint: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.model_id:
            raise ConfigError("model_id", self.model_id, "a non-empty model name or path")
        if self.tp_size < 1:
            raise ConfigError("tp_size", self.tp_size, "an integer >= 1")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ConfigError("tp_rank", self.tp_rank, f"an integer in [0, {self.tp_size})")
        doc = {
            "kvtier": self.layout_version,
            "model": self.model_id,
            "geometry": self.geometry.as_dict(),
            "tp": [self.tp_rank, self.tp_size],
            "tenant": self.tenant,
            "extra": [list(kv) for kv in sorted(self.extra)],
        }
        canonical = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        digest = hashlib.blake2b(canonical, digest_size=FINGERPRINT_BYTES).digest()
        object.__setattr__(self, "fingerprint", digest)

    @property
    def hex(self) -> str:
        return self.fingerprint.hex()
