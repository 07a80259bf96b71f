"""Mooncake Store tier, through Mooncake's own Python client (`mooncake.store`).

Pages move between host slots and the store without an intermediate buffer: batch_upsert_from
reads each slot by address and batch_get_into writes straight into it. Over the `tcp` protocol
the client copies from any address; RDMA needs the memory registered first, which
`register_host_memory()` does once for a whole host pool (the store refuses overlapping
registrations, so slots are never registered one by one).

Store semantics handled here:
- keys are write-once (a second put keeps the old value): stores use upsert;
- a read takes a lease (about 10 s) during which a plain remove fails: removes are forced (a
  reader that loses the race reads a blob that fails its checksum, a counted miss);
- the client contributes `global_segment_size` bytes of this process's memory to the store and
  the master evicts under pressure: pages can vanish, and then they are load misses.

Start-up never blocks the cache: the client is set up on a background thread (the master is
probed first, since the client's own setup retries for about 90 s against a dead master); until
it is ready every batch fails fast as a counted miss. After a master restart the client
reconnects by itself; pages the old master knew are gone and load as misses.

Loads: batch_get_into copies each blob into its slot and the base class then verifies every
page, a checksum pass over the bytes. From this process's own segment the copy is a memcpy on the
client's transfer thread (~16 GB/s on a 2-core machine) and both passes are bound by memory
bandwidth, so verification costs a load about a fifth against the raw client. Tried and dropped,
as no gain showed beyond the run-to-run noise (20+ bench runs each): fetching a batch in 2- to
8-page chunks on several threads and verifying each chunk as soon as it landed (over tcp to
another node every extra batch_get_into costs milliseconds, which made such loads 10-40%
slower); verifying one batch on two threads; verifying the most recently copied pages first.

Listeners: the master is started with every listener on loopback in the tests; the client's
transfer engine listens on all interfaces (a P2P handshake port and a tcp data port), which the
client library does not let us change.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kvtier.errors import ConfigError
from kvtier.keys import PageKey
from kvtier.tiers.base import Item, ThreadedTier, TierContext, TierStats
from kvtier.tiers.options import Cooldown, KnownPages, Options, drop_corrupt
from kvtier.tiers.registry import register_tier

log = logging.getLogger("kvtier.tiers.mooncake")


# error codes of mooncake.store batch calls that are not faults of the store itself
_NOT_FOUND = -704  # no such object (evicted, never stored, or lost with a master restart)
_TOO_SMALL = -600  # the object does not fit the buffer (on get): not a page of ours


def _addr(buf: memoryview) -> int:
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


class MooncakeTier(ThreadedTier):
    """Pages as objects in a Mooncake Store cluster (master + the memory its clients mount)."""

    kind = "mooncake"

    def __init__(
        self,
        name: str,
        ctx: TierContext,
        master: str,
        *,
        local_hostname: str = "127.0.0.1",
        metadata_server: str = "P2PHANDSHAKE",
        protocol: str = "tcp",
        device: str = "",
        global_segment_size: int = 256 << 20,
        local_buffer_size: int = 16 << 20,
        prefix: str = "kvtier:",
        connect_timeout_s: float = 15.0,
        retry_after_s: float = 1.0,
        threads: int = 2,
        max_inflight: int = 8,
    ) -> None:
        # the C++ client logs every RPC at INFO through glog; keep warnings and errors only
        os.environ.setdefault("GLOG_minloglevel", "1")
        try:
            from mooncake.store import MooncakeDistributedStore
        except ImportError as exc:
            raise ConfigError(
                f"tiers.{name}.kind", "mooncake",
                "an installed client: pip install mooncake-transfer-engine-non-cuda "
                "(and apt-get install -y libibverbs1 ibverbs-providers)",
            ) from exc
        super().__init__(name, ctx, threads=threads, max_inflight=max_inflight)
        self._factory = MooncakeDistributedStore
        self.master = master
        self._setup_args = (
            local_hostname, metadata_server, global_segment_size, local_buffer_size,
            protocol, device, master,
        )
        self._prefix = prefix
        self._store: Any = None
        self._ready = threading.Event()
        self._closing = threading.Event()
        self._regions: list[tuple[int, int]] = []
        self._known = KnownPages()
        self._cooldown = Cooldown(retry_after_s)
        self._connector = threading.Thread(
            target=self._connect_loop, name=f"kvtier-{name}-connect", daemon=True
        )
        self._connector.start()
        if not self._ready.wait(connect_timeout_s):
            log.warning("tier %s: master %s not reachable yet; misses until it is", name, master)

    # -- connection -----------------------------------------------------------------------------
    def _master_reachable(self) -> bool:
        host, _, port = self.master.rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), 1.0):
                return True
        except (OSError, ValueError):
            return False

    def _connect_loop(self) -> None:
        while not self._closing.is_set():
            if self._master_reachable():
                store = self._factory()
                rc = store.setup(*self._setup_args)
                if rc == 0:
                    self._store = store
                    for ptr, size in self._regions:
                        store.register_buffer(ptr, size)
                    self._ready.set()
                    log.info("tier %s: connected to mooncake master %s", self.name, self.master)
                    return
                with contextlib.suppress(Exception):
                    store.close()
            self._closing.wait(1.0)

    def _client(self) -> Any:
        if not self._ready.is_set():
            raise ConnectionError(f"mooncake client for {self.master} not set up yet")
        self._cooldown.check(self.master)
        return self._store

    def _fault(self, what: str, exc: BaseException) -> None:
        super()._fault(what, exc)
        self._cooldown.trip(exc)

    def register_host_memory(self, ptr: int, nbytes: int) -> None:
        """Register one host-pool buffer with the transfer engine (needed for RDMA; harmless
        for tcp). Call once per pool, before its slots are used."""
        self._regions.append((ptr, nbytes))
        if self._ready.is_set():
            rc = self._store.register_buffer(ptr, nbytes)
            if rc != 0:
                raise ConfigError(f"tiers.{self.name}", hex(ptr), f"registrable memory (rc {rc})")

    def _name(self, key: PageKey) -> str:
        return self._prefix + key.hex()

    # -- blocking primitives -----------------------------------------------------------------
    def _contains_batch(self, keys: Sequence[PageKey]) -> list[bool]:
        if not keys:
            return []
        codes = self._client().batch_is_exist([self._name(k) for k in keys])
        if any(c < 0 for c in codes):
            raise ConnectionError(f"batch_is_exist failed: {min(codes)}")
        return [c == 1 for c in codes]

    def _store_batch(self, items: Sequence[Item]) -> list[bool]:
        store = self._client()
        codes = store.batch_upsert_from(
            [self._name(k) for k, _ in items],
            [_addr(buf) for _, buf in items],
            [len(buf) for _, buf in items],
        )
        flags = [c == 0 for c in codes]
        if not any(flags) and items:
            raise ConnectionError(f"batch_upsert_from failed: {min(codes)}")
        self._known.stored(items, flags)
        self._recovered()
        return flags

    def _load_batch(self, items: Sequence[Item]) -> list[bool]:
        store = self._client()
        codes = store.batch_get_into(
            [self._name(k) for k, _ in items],
            [_addr(buf) for _, buf in items],
            [len(buf) for _, buf in items],
        )
        flags = [c == len(buf) for (_, buf), c in zip(items, codes)]
        # a positive count other than the blob size, or "buffer too small", is a damaged object
        wrong = [k for (k, buf), c in zip(items, codes) if 0 < c != len(buf) or c == _TOO_SMALL]
        gone = [k for (k, _), c in zip(items, codes) if c == _NOT_FOUND]
        faults = [c for c in codes if c < 0 and c not in (_NOT_FOUND, _TOO_SMALL)]
        if faults:
            self._fault("load", ConnectionError(f"batch_get_into error {faults[0]}"))
        self._known.forget(gone)
        if any(flags):
            self._recovered()
        drop_corrupt(self, wrong, "object of the wrong size")
        return flags

    def _remove_batch(self, keys: Sequence[PageKey]) -> None:
        self._known.forget(keys)
        if keys:
            # forced: a read lease would otherwise keep a corrupt or invalidated page alive
            self._client().batch_remove([self._name(k) for k in keys], True)

    # -- reporting ------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def stats(self) -> TierStats:
        return self._known.stats(self)

    def check_integrity(self) -> None:
        stats = self.stats()
        assert stats.pages >= 0 and self.inflight() >= 0
        assert self._ready.is_set() == (self._store is not None), "ready flag out of step"

    def close(self) -> None:
        self._closing.set()
        super().close()
        self._connector.join(5)
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._store.close()
            self._store = None
            self._ready.clear()


@register_tier("mooncake")
def make_mooncake_tier(name: str, options: Mapping[str, Any], ctx: TierContext) -> MooncakeTier:
    o = Options(name, options)
    master = o.string("master", "127.0.0.1:50051")
    if ":" not in master or not master.rpartition(":")[2].isdigit():
        raise ConfigError(o.field("master"), master, "host:port of mooncake_master's RPC server")
    kw: dict[str, Any] = {
        "local_hostname": o.string("local_hostname", "127.0.0.1"),
        "metadata_server": o.string("metadata_server", "P2PHANDSHAKE"),
        "protocol": o.choice("protocol", "tcp", ("tcp", "rdma")),
        "device": str(o.raw("device", "")),
        "global_segment_size": o.size("global_segment_size", "256MiB", minimum=0),
        "local_buffer_size": o.size("local_buffer_size", "16MiB", minimum=0),
        "prefix": o.string("prefix", "kvtier:"),
        "connect_timeout_s": o.seconds("connect_timeout_s", 15.0) or 15.0,
        "retry_after_s": o.seconds("retry_after_s", 1.0) or 1.0,
        "threads": o.integer("threads", 2),
        "max_inflight": o.integer("max_inflight", 8),
    }
    o.finish()
    return MooncakeTier(name, ctx, master, **kw)
