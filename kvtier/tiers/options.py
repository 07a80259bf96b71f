"""Option checking shared by the tier factories, and the corrupt-page bookkeeping they share.

Every checker names the field as `tiers.<tier name>.<option>` so a bad config fails at start
with a message that says which line to fix.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from kvtier.errors import ConfigError
from kvtier.keys import PageKey
from kvtier.tiers.base import Item, ThreadedTier, TierStats
from kvtier.units import parse_size

log = logging.getLogger("kvtier.tiers")


class Options:
    """Reads one tier's options, remembering which were used so unknown ones can be refused."""

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        self.name = name
        self.data = dict(options)
        self._used: set[str] = set()

    def field(self, key: str) -> str:
        return f"tiers.{self.name}.{key}"

    def raw(self, key: str, default: Any = None) -> Any:
        self._used.add(key)
        return self.data.get(key, default)

    def string(self, key: str, default: str | None = None) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str) or not value:
            raise ConfigError(self.field(key), value, "a non-empty string")
        return value

    def size(self, key: str, default: str | int, minimum: int = 1) -> int:
        value = parse_size(self.raw(key, default), self.field(key))
        if value < minimum:
            raise ConfigError(self.field(key), value, f"a size of at least {minimum} bytes")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise ConfigError(self.field(key), value, "true or false")
        return value

    def integer(self, key: str, default: int, minimum: int = 1) -> int:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(self.field(key), value, f"an integer >= {minimum}")
        return value

    def seconds(self, key: str, default: float | None) -> float | None:
        value = self.raw(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(self.field(key), value, "a positive number of seconds (or null)")
        return float(value)

    def choice(self, key: str, default: str, allowed: Sequence[str]) -> str:
        value = self.raw(key, default)
        if value not in allowed:
            raise ConfigError(self.field(key), value, allowed)
        return str(value)

    def finish(self) -> None:
        """Refuse options nobody read (typos would otherwise be silently ignored)."""
        unknown = sorted(set(self.data) - self._used)
        if unknown:
            k = unknown[0]
            raise ConfigError(self.field(k), self.data[k], f"a known option: {sorted(self._used)}")


def drop_corrupt(tier: ThreadedTier, keys: Sequence[PageKey], reason: str) -> None:
    """Count `keys` as corrupt misses, remove them from `tier`, and report them as removed.

    For damage a tier sees before the blob check of the base class can (a short file, a value of
    the wrong length); the base class handles blobs that arrive whole but fail verification.
    """
    if not keys:
        return
    log.warning("tier %s: dropping %d corrupt page(s): %s", tier.name, len(keys), reason)
    with tier._lock:
        tier._counts["corrupt"] += len(keys)
    tier.remove(keys)
    tier._note_removed(keys)


class CoolingDown(ConnectionError):
    """Raised instead of calling a server that failed less than `retry_after_s` ago."""


class Cooldown:
    """After a fault, fail calls at once for `seconds` instead of waiting on the server again.

    A hung server costs one socket timeout, not one per lookup: the cache asks a tier's
    contains() under its lock, so a tier that kept timing out would stall every request.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._until = 0.0

    def trip(self, exc: BaseException) -> None:
        """Start (or restart) the quiet period after a real fault; not after our own refusal,
        which would keep the tier down for as long as it is being asked."""
        if not isinstance(exc, CoolingDown):
            self._until = time.monotonic() + self.seconds

    def check(self, what: str) -> None:
        """Raise ConnectionError while cooling down (the tier turns it into misses)."""
        if time.monotonic() < self._until:
            raise CoolingDown(f"{what}: server marked down for {self.seconds:g} s after a fault")


class KnownPages:
    """The pages this process stored in a server-owned tier and has not seen disappear: an
    estimate for `stats()`, since other processes, eviction and expiry change the server too.
    Thread-safe."""

    def __init__(self) -> None:
        self._keys: set[PageKey] = set()
        self._lock = threading.Lock()

    def stored(self, items: Sequence[Item], flags: Sequence[bool]) -> None:
        with self._lock:
            self._keys.update(k for (k, _), ok in zip(items, flags) if ok)

    def forget(self, keys: Sequence[PageKey]) -> None:
        with self._lock:
            self._keys.difference_update(keys)

    def stats(self, tier: ThreadedTier) -> TierStats:
        with self._lock:
            pages = len(self._keys)
        return tier._stats(pages, pages * tier.ctx.blob_bytes, None)
