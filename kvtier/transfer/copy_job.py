"""A copy-engine job's record and the result it is reported as.

The engine (kvtier.transfer.engine) tracks these records and the GPU enqueuing
(kvtier.transfer.gpu_enqueue) fills in their events; both import the one definition from here.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch


class TransferResult(NamedTuple):
    job_id: int
    op: str
    success: bool
    nbytes: int
    seconds: float


@dataclass
class CopyJob:
    job_id: int
    op: str
    nbytes: int
    path: str
    start: torch.cuda.Event | None = None
    done: torch.cuda.Event | None = None
    layer_events: list[torch.cuda.Event] = field(default_factory=list)
    keep: list[object] = field(default_factory=list)
    error: str | None = None
    t0: float = 0.0
    # set once the job's copies are enqueued (GPU) or done (CPU); at once without submit threads
    enqueued: threading.Event = field(default_factory=threading.Event)
    wall: float | None = None  # CPU jobs: seconds the copies took

    def finished_now(self) -> bool:
        return self.enqueued.is_set() and (self.done is None or self.done.query())

    def result(self) -> TransferResult:
        """The job as reported: GPU time between its events where they exist, else wall time."""
        seconds = self.wall if self.wall is not None else time.perf_counter() - self.t0
        if self.start is not None and self.done is not None:
            with contextlib.suppress(RuntimeError):
                seconds = self.start.elapsed_time(self.done) / 1e3
        return TransferResult(self.job_id, self.op, self.error is None, self.nbytes, seconds)
