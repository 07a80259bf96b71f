"""Redis / Valkey tier (redis-py): one key per page, pipelined batches, optional TTL.

Key names are `<prefix><page key hex>`; page keys already carry the namespace, so caches of
different models can share one server and never see each other's pages.

Copies: a store sends each slot's memoryview as it is (redis-py's Python serializer passes
memoryviews to sendall without joining them into one buffer). A load reads the replies itself
(kvtier.tiers.resp): each value goes from the socket straight into its slot with recv_into, and is
verified right after it lands, while it is still in cache and while the server keeps sending
the next values into the socket buffer. redis-py would materialize every value as a bytes
object (its Python reader even joins and slices it a few times), which the tier would then
have to copy into the slot: for 2 MiB pages that costs more than the transfer. Load connections
come from a pool of their own (RESP2, so no push messages can interleave) and are only ever
read by `Replies`; any surprise in a reply drops the connection rather than reuse it.

Tried and dropped: a larger socket_read_size (1-4 MiB) and the hiredis parser still build one
bytes object per value, which then has to be copied into the slot (the tier stayed at 50-70% of a
client that discards the values). hiredis also slows stores 3-4x: redis-py packs commands with it
by copying each memoryview into bytes and then into one command buffer. Two jobs reading in
parallel on two connections were no faster than one against a loopback server.

Faults: connect and socket timeouts bound every call; a call retries once without backoff (a
pooled connection broken by a server restart is replaced on the retry; a load retries only if
no reply byte had arrived) and then fails the batch, so a dead or hung server gives failed keys
within about `socket_timeout_s` rather than a hang. After a fault every call fails at once for
`retry_after_s`, so a hung server costs one timeout, not one per lookup. The connection pools
reconnect on their own when the server is back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kvtier.errors import ConfigError
from kvtier.keys import PageKey
from kvtier.tiers.base import Item, ThreadedTier, TierContext, TierStats
from kvtier.tiers.options import Cooldown, KnownPages, Options, drop_corrupt
from kvtier.tiers.registry import register_tier
from kvtier.tiers.resp import LoadRetry, Replies, ReplyError

_Check = Callable[[PageKey, memoryview], bool]
_Read = tuple[list[bool], list[PageKey], list[PageKey], list[PageKey]]  # ok, corrupt, gone, wrong


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
                f"tiers.{name}.kind", kind, "an installed client: pip install 'redis>=5.3'"
            ) from exc
        super().__init__(name, ctx, threads=threads, max_inflight=max_inflight)
        self.kind = kind
        self.url = url
        self._prefix = prefix.encode()
        self._ttl = None if ttl_s is None else max(1, round(ttl_s))
        self._errors = (redis.RedisError, OSError)
        common: dict[str, Any] = {
            "socket_connect_timeout": connect_timeout_s,
            "socket_timeout": socket_timeout_s,
            "retry": Retry(NoBackoff(), 1),
        }
        try:
            self._client = redis.Redis.from_url(
                url, max_connections=threads + 4, health_check_interval=30, **common
            )
            # Read only by Replies. RESP2: the replies are exactly the commands' own. No health
            # check PING: the pool already replaces a connection the server closed, and a load
            # that fails before any reply arrives is retried once (redis-py 5.3 also loops on a
            # health check that times out while it connects).
            self._loads = redis.ConnectionPool.from_url(
                url, protocol=2, max_connections=threads + 2, **common
            )
        except ValueError as exc:
            raise ConfigError(f"tiers.{name}.url", url, f"a redis:// URL ({exc})") from exc
        self._known = KnownPages()
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
        self._known.stored(items, flags)
        self._recovered()
        return flags

    def _load_batch(self, items: Sequence[Item]) -> list[bool]:
        return self._read(items, None)[0]

    def _load_verified(self, items: Sequence[Item]) -> tuple[list[bool], list[PageKey]]:
        return self._read(items, self._verify_page)

    def _read(
        self, items: Sequence[Item], check: _Check | None
    ) -> tuple[list[bool], list[PageKey]]:
        """GET every item's value straight into its slot; with `check`, verify each page as
        soon as it has landed. Returns (flags, corrupt keys)."""
        self._cooldown.check(self.url)
        if not items:
            return [], []
        try:
            got = self._read_once(items, check, retry=True)
        except LoadRetry:  # the server dropped a pooled connection (restart): once more, fresh
            got = self._read_once(items, check, retry=False)
        flags, corrupt, gone, wrong = got
        self._known.forget(gone)
        self._recovered()
        drop_corrupt(self, wrong, "value of the wrong length")
        return flags, corrupt

    def _read_once(self, items: Sequence[Item], check: _Check | None, *, retry: bool) -> _Read:
        names = [self._name(k) for k, _ in items]
        conn = self._loads.get_connection()
        replies = None
        try:
            if self._ttl is None:
                conn.send_packed_command(conn.pack_command("MGET", *names))
            else:  # a hit renews the page's lease on life
                conn.send_packed_command(
                    conn.pack_commands([("GETEX", n, "EX", self._ttl) for n in names])
                )
            replies = Replies(conn._sock)
            return self._read_replies(replies, items, check)
        except BaseException as exc:
            conn.disconnect()  # the reply stream is in an unknown state: never reuse it
            fresh = replies is None or replies.received == 0
            if retry and fresh and isinstance(exc, self._errors):
                raise LoadRetry from exc
            raise
        finally:
            self._loads.release(conn)

    def _read_replies(
        self, replies: Replies, items: Sequence[Item], check: _Check | None
    ) -> _Read:
        if self._ttl is None and replies.array() != len(items):
            raise ReplyError("MGET answered with a different number of values")
        flags = [False] * len(items)
        corrupt: list[PageKey] = []
        gone: list[PageKey] = []
        wrong: list[PageKey] = []
        for i, (key, buf) in enumerate(items):
            size = replies.value_into(buf)
            if size == len(buf):
                if check is None or check(key, buf):
                    flags[i] = True
                else:
                    corrupt.append(key)
            elif size == -1:
                gone.append(key)
            elif isinstance(size, int):
                wrong.append(key)
            # an error reply (e.g. WRONGTYPE: another client's value there) is a plain miss
        return flags, corrupt, gone, wrong

    def _remove_batch(self, keys: Sequence[PageKey]) -> None:
        self._known.forget(keys)
        for i in range(0, len(keys), 512):
            self._client.delete(*(self._name(k) for k in keys[i : i + 512]))

    # -- reporting ------------------------------------------------------------------------------
    def ping(self) -> bool:
        try:
            return bool(self._client.ping())
        except self._errors:
            return False

    def stats(self) -> TierStats:
        return self._known.stats(self)

    def check_integrity(self) -> None:
        stats = self.stats()
        assert stats.pages >= 0 and self.inflight() >= 0
        assert stats.loads_ok + stats.loads_failed >= stats.corrupt, "corrupt pages not counted"

    def close(self) -> None:
        super().close()
        self._client.close()
        self._loads.disconnect()


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
