"""Redis / Valkey tier (redis-py): one key per page, pipelined batches, optional TTL.

Key names are `<prefix><page key hex>`; page keys already carry the namespace, so caches of
different models can share one server and never see each other's pages.

Copies: a store sends each slot's memoryview as it is (redis-py's Python serializer passes
memoryviews to sendall without joining them into one buffer). A load copies the bytes redis-py
returns into the slot: redis-py always materializes a reply as a bytes object, so that one copy
is unavoidable with this client.

Faults: connect and socket timeouts bound every call; the client retries once without backoff
(a pooled connection broken by a server restart is replaced on the retry) and then fails the
batch, so a dead or hung server gives failed keys within about `socket_timeout_s` rather than a
hang. After a fault every call fails at once for `retry_after_s`, so a hung server costs one
timeout, not one per lookup. The connection pool reconnects on its own when the server is back.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

from kvtier.errors import ConfigError
from kvtier.keys import PageKey
from kvtier.tiers.base import Item, ThreadedTier, TierContext, TierStats
from kvtier.tiers.options import Cooldown, Options, drop_corrupt
from kvtier.tiers.registry import register_tier


class RedisTier(ThreadedTier):
    """Pages as string values in Redis or Valkey.

    The server owns capacity (its `maxmemory` and eviction policy) and expiry (`ttl_s`); pages it
    drops show up as load misses. `stats().pages` counts the pages this process stored and has not
    seen disappear - an estimate, since other processes and expiry change the server too.
    """

    def __init__(
        self,
        name: str,
        ctx: TierContext,
        url: str,
        *,
        kind: str = "redis",
        prefix: str = "kvtier:",
        ttl_s: float | None = None,
        connect_timeout_s: float = 2.0,
        socket_timeout_s: float = 5.0,
        retry_after_s: float = 1.0,
        threads: int = 2,
        max_inflight: int = 8,
    ) -> None:
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as exc:
            raise ConfigError(
                f"tiers.{name}.kind", kind, "an installed client: pip install 'redis>=5'"
            ) from exc
        super().__init__(name, ctx, threads=threads, max_inflight=max_inflight)
        self.kind = kind
        self.url = url
        self._prefix = prefix.encode()
        self._ttl = None if ttl_s is None else max(1, round(ttl_s))
        self._errors = (redis.RedisError, OSError)
        try:
            self._client = redis.Redis.from_url(
                url,
                socket_connect_timeout=connect_timeout_s,
                socket_timeout=socket_timeout_s,
                retry=Retry(NoBackoff(), 1),
                health_check_interval=30,
                max_connections=threads + 4,
            )
        except ValueError as exc:
            raise ConfigError(f"tiers.{name}.url", url, f"a redis:// URL ({exc})") from exc
        self._known: set[PageKey] = set()
        self._known_lock = threading.Lock()
        self._cooldown = Cooldown(retry_after_s)

    def _fault(self, what: str, exc: BaseException) -> None:
        super()._fault(what, exc)
        self._cooldown.trip(exc)

    def _name(self, key: PageKey) -> bytes:
        return self._prefix + key.hex().encode()

    # -- blocking primitives -----------------------------------------------------------------
    def _contains_batch(self, keys: Sequence[PageKey]) -> list[bool]:
        if not keys:
            return []
        self._cooldown.check(self.url)
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.exists(self._name(key))
        return [bool(n) for n in pipe.execute()]

    def _store_batch(self, items: Sequence[Item]) -> list[bool]:
        self._cooldown.check(self.url)
        pipe = self._client.pipeline(transaction=False)
        for key, buf in items:
            pipe.set(self._name(key), buf, ex=self._ttl)
        replies = pipe.execute(raise_on_error=False)
        flags = [r is True for r in replies]
        with self._known_lock:
            self._known.update(k for (k, _), ok in zip(items, flags) if ok)
        self._recovered()
        return flags

    def _load_batch(self, items: Sequence[Item]) -> list[bool]:
        self._cooldown.check(self.url)
        names = [self._name(k) for k, _ in items]
        values: list[Any]
        if self._ttl is not None:  # a hit renews the page's lease on life
            pipe = self._client.pipeline(transaction=False)
            for n in names:
                pipe.getex(n, ex=self._ttl)
            values = pipe.execute(raise_on_error=False)
        else:
            values = self._client.mget(names)
        flags = [False] * len(items)
        gone: list[PageKey] = []
        wrong: list[PageKey] = []
        for i, ((key, buf), value) in enumerate(zip(items, values)):
            if value is None:
                gone.append(key)
            elif isinstance(value, bytes):
                if len(value) == len(buf):
                    buf[:] = value  # the one copy: reply bytes -> host slot
                    flags[i] = True
                else:
                    wrong.append(key)
        with self._known_lock:
            self._known.difference_update(gone)
        self._recovered()
        drop_corrupt(self, wrong, "value of the wrong length")
        return flags

    def _remove_batch(self, keys: Sequence[PageKey]) -> None:
        with self._known_lock:
            self._known.difference_update(keys)
        for i in range(0, len(keys), 512):
            self._client.delete(*(self._name(k) for k in keys[i : i + 512]))

    # -- reporting ------------------------------------------------------------------------------
    def ping(self) -> bool:
        try:
            return bool(self._client.ping())
        except self._errors:
            return False

    def stats(self) -> TierStats:
        with self._known_lock:
            pages = len(self._known)
        return self._stats(pages, pages * self.ctx.blob_bytes, None)

    def check_integrity(self) -> None:
        stats = self.stats()
        assert stats.pages >= 0 and self.inflight() >= 0
        assert stats.loads_ok + stats.loads_failed >= stats.corrupt, "corrupt pages not counted"

    def close(self) -> None:
        super().close()
        self._client.close()


def _make(kind: str, name: str, options: Mapping[str, Any], ctx: TierContext) -> RedisTier:
    o = Options(name, options)
    url = o.string("url", "redis://127.0.0.1:6379/0")
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(o.field("url"), url, "a redis://host:port/db, rediss:// or unix:// URL")
    kw: dict[str, Any] = {
        "prefix": o.string("prefix", "kvtier:"),
        "ttl_s": o.seconds("ttl_s", None),
        "connect_timeout_s": o.seconds("connect_timeout_s", 2.0),
        "socket_timeout_s": o.seconds("socket_timeout_s", 5.0),
        "retry_after_s": o.seconds("retry_after_s", 1.0),
        "threads": o.integer("threads", 2),
        "max_inflight": o.integer("max_inflight", 8),
    }
    for k in ("connect_timeout_s", "socket_timeout_s", "retry_after_s"):
        if kw[k] is None:
            raise ConfigError(o.field(k), None, "a positive number of seconds")
    o.finish()
    return RedisTier(name, ctx, url, kind=kind, **kw)


@register_tier("redis")
def make_redis_tier(name: str, options: Mapping[str, Any], ctx: TierContext) -> RedisTier:
    return _make("redis", name, options, ctx)


@register_tier("valkey")
def make_valkey_tier(name: str, options: Mapping[str, Any], ctx: TierContext) -> RedisTier:
    return _make("valkey", name, options, ctx)
