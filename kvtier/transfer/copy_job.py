"""A copy-engine job's record and the result it is reported as.

The engine (kvtier.transfer.engine) tracks these records and the GPU enqueuing
(kvtier.transfer.gpu_enqueue) fills in their events; both import the one definition from here.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
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


class EventPool:
    """CUDA events for reuse. An event's first record creates it in the driver (20-30 us on the
    hosts measured, several per job, before a job's first copy), a later record costs a
    fraction. Take an event, give it back once nothing will record or wait on it again: a
    job's events once its result is reported; an event waited on at once, right after the
    wait (a stream waits for the record made before the wait call, not for later ones).
    Thread-safe (deque append and pop are atomic)."""

    def __init__(self) -> None:
        self._free: dict[bool, deque[torch.cuda.Event]] = {True: deque(), False: deque()}

    def take(self, timing: bool = False) -> torch.cuda.Event:
        try:
            return self._free[timing].pop()
        except IndexError:
            return torch.cuda.Event(enable_timing=timing)

    def give(self, event: torch.cuda.Event | None, timing: bool = False) -> None:
        if event is not None:
            self._free[timing].append(event)

    def give_job(self, job: CopyJob) -> None:
        """Every event of reported job `job` (its record keeps none of them)."""
        self.give(job.start, True)
        self.give(job.done, True)
        for ev in job.layer_events:
            self.give(ev)
        job.start = job.done = None
        job.layer_events = []
