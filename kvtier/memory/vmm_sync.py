"""Tensor-parallel mapping sync: one rank decides, every rank maps the same slots.

The leader's ElasticPool (created with `record_ops=True`) records each mapping decision as a
`MapOp(op, va_offset, tier)`. Once per engine step every rank calls `sync_step`: the leader
sends its drained ops, the followers apply them to their own pools, each on its own GPUs (`tier`
0 is each rank's local GPU, tier i its i-th shared peer). Slots are identical across ranks
because the layouts are (every TP rank holds the same number of blocks of the same shape).

Channels:
- `TorchDistChannel`: `torch.distributed.broadcast_object_list` from the leader rank; a
  collective, so every rank must call it at the same step (as the engine's workers do).
- `FileChannel`: numbered JSON messages in a directory (atomic rename); followers poll for the
  next number. For engines without a process group, and for tests.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

from kvtier.errors import TierError
from kvtier.memory.elastic import ElasticPool, MapOp


class MapChannel(ABC):
    """Carries one batch of MapOps from the leader to every follower per call.

    `exchange(ops)` is called by every rank once per step; the leader passes its ops and gets
    them back, a follower passes None and gets the leader's ops. Raises TierError on timeout
    or a broken channel; the batch is then lost and the TP group must be rebuilt.
    """

    @abstractmethod
    def exchange(self, ops: list[MapOp] | None) -> list[MapOp]:
        """Send (leader) or receive (follower) the next batch."""


class TorchDistChannel(MapChannel):
    """Broadcast over an initialised torch.distributed process group."""

    def __init__(self, src: int = 0, group: object = None) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise TierError("TorchDistChannel: torch.distributed is not initialised")
        self._dist = dist
        self.src = src
        self.group = group

    def exchange(self, ops: list[MapOp] | None) -> list[MapOp]:
        box: list[object] = [[tuple(o) for o in ops] if ops is not None else None]
        self._dist.broadcast_object_list(box, src=self.src, group=self.group)  # type: ignore[arg-type]
        payload = box[0]
        if not isinstance(payload, list):
            raise TierError("TorchDistChannel: leader sent no batch")
        return [MapOp(*o) for o in payload]


class FileChannel(MapChannel):
    """Messages `<dir>/<seq>.json`; the leader keeps the last `keep` messages on disk."""

    def __init__(self, directory: str | Path, timeout: float = 30.0, keep: int = 1024) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        self.keep = keep
        self.seq = 0

    def exchange(self, ops: list[MapOp] | None) -> list[MapOp]:
        path = self.dir / f"{self.seq:012d}.json"
        if ops is not None:
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-")
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump([list(o) for o in ops], fh)
            os.replace(tmp, path)
            (self.dir / f"{self.seq - self.keep:012d}.json").unlink(missing_ok=True)
            self.seq += 1
            return list(ops)
        deadline = time.monotonic() + self.timeout
        delay = 0.0005
        while True:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                break
            except FileNotFoundError:
                if time.monotonic() > deadline:
                    raise TierError(
                        f"FileChannel: no message {self.seq} after {self.timeout}s"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.02)
        self.seq += 1
        return [MapOp(str(o[0]), int(o[1]), int(o[2])) for o in data]


def default_channel(directory: str | Path, src: int = 0) -> MapChannel:
    """torch.distributed when a process group is up, else a FileChannel in `directory`
    (every rank of the TP group must pass the same directory, e.g. under the run dir)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return TorchDistChannel(src=src)
    except ImportError:
        pass
    return FileChannel(directory)


def apply_ops(pool: ElasticPool, ops: Sequence[MapOp]) -> None:
    """Apply a leader's decisions to a follower's pool: map (the tier resolved against the
    follower's own placement order) or unmap the same slots. A follower does no block
    bookkeeping of its own. Raises AllocationError for an op that does not fit its state and
    CapacityError when its tier has no room: the TP group is then out of step."""
    with pool.lock():
        tiers = pool.tiers()
        for op in ops:
            pool._follow(op, tiers)


def sync_step(pool: ElasticPool, channel: MapChannel, leader: bool) -> list[MapOp]:
    """One step of TP sync; returns the ops of this step. The leader's pool must record ops."""
    if leader:
        return channel.exchange(pool.drain_ops())
    ops = channel.exchange(None)
    apply_ops(pool, ops)
    return ops
