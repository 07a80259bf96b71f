"""Construction of the nixl tier's slot stores: a slab directory (tiers.slabs) or a bucket."""

from __future__ import annotations

import os
import socket
import urllib.parse

from kvtier.errors import ConfigError
from kvtier.tiers.base import TierContext
from kvtier.tiers.nixl_io import FileSlots, NixlIOError, ObjectSlots, SlotStore
from kvtier.tiers.options import Options
from kvtier.tiers.slabs import ALIGN, open_slab_dir


def open_slabs(name: str, path: str, ctx: TierContext, budget: int, slab_size: int,
               params: dict[str, str], timeout: float) -> tuple[FileSlots, int]:
    """The slab files of this namespace under `path`, locked for this process.
    Returns (store, lock fd)."""
    slabs = open_slab_dir(name, path, ctx, budget, slab_size)
    assert slabs.lock_fd is not None  # a writer's directory
    try:
        return FileSlots(slabs, params, timeout), slabs.lock_fd
    except BaseException:
        os.close(slabs.lock_fd)
        raise


def make_store(name: str, o: Options, ctx: TierContext, budget: int, timeout: float,
               ) -> tuple[SlotStore, int | None]:
    """Build the slot store the options ask for (see make_nixl_tier)."""
    backend = o.choice("backend", "posix", ["posix", "obj"])
    if backend == "posix":
        io = o.choice("io", "aio", ["aio", "uring", "posix_aio", "sync"])
        params = {"use_aio": "false", "use_uring": "false", "use_posix_aio": "false"}
        if io != "sync":
            params[f"use_{io}"] = "true"
        path, slab = o.string("path"), o.size("slab_size", "1GiB", minimum=ALIGN)
        try:
            return open_slabs(name, path, ctx, budget, slab, params, timeout)
        except NixlIOError as exc:
            raise ConfigError(o.field("backend"), backend,
                              f"a working NIXL plugin ({exc})") from exc
        except ConfigError:
            raise
        except Exception as exc:  # NIXL's own error types: the backend would not start
            raise ConfigError(o.field("io"), io, f"an I/O mode NIXL POSIX starts with ({exc})") \
                from exc
    endpoint = o.raw("endpoint", None)
    params = {"bucket": o.string("bucket"), "region": o.string("region", "us-east-1")}
    if endpoint is not None:
        endpoint = o.string("endpoint")
        if not endpoint.startswith(("http://", "https://")):
            raise ConfigError(o.field("endpoint"), endpoint, "an http:// or https:// URL")
        _reachable(o.field("endpoint"), endpoint)
        params.update(endpoint_override=endpoint, scheme=endpoint.split(":", 1)[0],
                      use_virtual_addressing="false")
    for opt in ("access_key", "secret_key"):
        if o.raw(opt, None) is not None:  # else the AWS SDK's usual environment and files
            params[opt] = o.string(opt)
    prefix = o.string("prefix", "kvtier/") + ctx.fingerprint.hex() + "/"
    num_slots = budget // ctx.blob_bytes
    try:
        return ObjectSlots(prefix, num_slots, ctx.blob_bytes, params, timeout), None
    except Exception as exc:  # no OBJ plugin, or it would not start with these options
        raise ConfigError(o.field("backend"), backend, f"a working NIXL OBJ plugin ({exc})") \
            from exc


def _reachable(field: str, url: str) -> None:
    """Fail at start, and fast, when nothing listens at the endpoint (the S3 client would
    otherwise retry for tens of seconds per request before the start-up scan gives up)."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((parts.hostname or "", port), timeout=5.0):
            pass
    except (OSError, ValueError) as exc:
        raise ConfigError(field, url, f"a reachable S3 endpoint ({exc})") from exc
