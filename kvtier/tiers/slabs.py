"""Slab directories shared by the disk tier and the nixl tier's POSIX backend.

A namespace's pages live in `<path>/<namespace hex>/slab-NNNN.kvt`: a few large files of fixed
slots, opened once, sparse until written. `manifest.json` records the slot size and slots per
slab, so a restart with another `slab_size` still finds the pages where they are. A lock file
keeps a second live tier off the directory (two indexes over one set of slots would overwrite
each other's pages).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from typing import NamedTuple

from kvtier.errors import ConfigError
from kvtier.tiers.base import TierContext

ALIGN = 4096  # slot stride: slots start page-aligned, like host slots


class SlabDir(NamedTuple):
    root: str
    slot_bytes: int
    per_slab: int
    num_slots: int
    lock_fd: int | None  # held (flock) for a writer's life; None for a reader

    def slab_path(self, i: int) -> str:
        return os.path.join(self.root, f"slab-{i:04d}.kvt")

    @property
    def slabs(self) -> int:
        return -(-self.num_slots // self.per_slab)

    def slab_bytes(self, i: int) -> int:
        return min(self.per_slab, self.num_slots - i * self.per_slab) * self.slot_bytes


def open_slab_dir(name: str, path: str, ctx: TierContext, budget: int,
                  slab_size: int, reader: bool = False) -> SlabDir:
    """Lock this namespace's slab directory under `path` and settle its layout. A reader takes
    no lock and writes nothing: it follows the manifest the writer left, if any."""
    root = os.path.join(path, ctx.fingerprint.hex())
    slot_bytes = -(-ctx.blob_bytes // ALIGN) * ALIGN
    if reader:
        num_slots = budget // slot_bytes
        if num_slots < 1:
            raise ConfigError(f"tiers.{name}.budget", budget, f">= one slot ({slot_bytes} B)")
        per_slab = max(slab_size // slot_bytes, 1)
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError, NotADirectoryError):
            with open(os.path.join(root, "manifest.json")) as f:
                doc = json.load(f)
            if doc["slot_bytes"] == slot_bytes:
                per_slab = int(doc["slots_per_slab"])
        return SlabDir(root, slot_bytes, per_slab, num_slots, None)
    try:
        os.makedirs(root, exist_ok=True)
        lock_fd = os.open(os.path.join(root, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"tiers.{name}.path", path, f"a writable directory ({exc})") from exc
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(lock_fd)
        raise ConfigError(f"tiers.{name}.path", path,
                          "a directory no other live tier uses") from exc
    try:
        num_slots = budget // slot_bytes
        if num_slots < 1:
            raise ConfigError(f"tiers.{name}.budget", budget, f">= one slot ({slot_bytes} B)")
        per_slab = max(slab_size // slot_bytes, 1)
        manifest = os.path.join(root, "manifest.json")
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
            with open(manifest) as f:
                doc = json.load(f)
            if doc["slot_bytes"] == slot_bytes:
                per_slab = int(doc["slots_per_slab"])  # keep the layout the pages are in
        with open(manifest + ".tmp", "w") as f:
            json.dump({"format": 1, "slot_bytes": slot_bytes, "slots_per_slab": per_slab}, f)
        os.replace(manifest + ".tmp", manifest)
        return SlabDir(root, slot_bytes, per_slab, num_slots, lock_fd)
    except BaseException:
        os.close(lock_fd)
        raise


def open_slab_files(d: SlabDir, reader: bool = False) -> list[int]:
    """Open (creating sparse) every slab file at its size for the budget; cut slots a smaller
    budget dropped and remove slabs a larger one left behind. Returns the fds. A reader opens
    the files that exist read-only and changes nothing (-1 for a slab not created yet)."""
    if reader:
        out = []
        for i in range(d.slabs):
            try:
                out.append(os.open(d.slab_path(i), os.O_RDONLY | os.O_CLOEXEC))
            except FileNotFoundError:
                out.append(-1)
        return out
    fds: list[int] = []
    try:
        for i in range(d.slabs):
            fd = os.open(d.slab_path(i), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fds.append(fd)
            if os.fstat(fd).st_size != d.slab_bytes(i):
                os.ftruncate(fd, d.slab_bytes(i))
        for stale in range(d.slabs, d.slabs + 1024):
            if not os.path.exists(d.slab_path(stale)):
                break
            os.unlink(d.slab_path(stale))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds
