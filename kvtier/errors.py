"""Exception types shared by every layer.

A ConfigError is raised at start-up and names the field and the fix; everything else is a run-time
fault that the cache turns into a counted miss rather than a crash in the engine.
"""

from __future__ import annotations

from collections.abc import Iterable


class KVTierError(Exception):
    """Base class of every error kvtier raises on purpose."""


class ConfigError(KVTierError, ValueError):
    """A configuration value is wrong; the message names the field, the value and the fix."""

    def __init__(self, field: str, value: object, allowed: str | Iterable[object]) -> None:
        if not isinstance(allowed, str):
            allowed = "one of " + ", ".join(repr(a) for a in allowed)
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field}: got {value!r}; expected {allowed}")


class BlobError(KVTierError):
    """A page blob failed validation: bad magic, version, namespace, key, length or checksum."""


class TierError(KVTierError):
    """A storage tier failed at run time (server gone, I/O error, timeout)."""


class CapacityError(KVTierError):
    """A pool or tier cannot hold what was asked for, even after eviction."""


class EvictionError(CapacityError):
    """Fewer keys are evictable than were asked for; the policy state is unchanged."""
