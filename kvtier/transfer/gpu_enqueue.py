"""Enqueuing a copy-engine job's copies on a GPU.

Stores and loads get a stream each, so the two directions overlap (PCIe is full duplex). A
job's copies wait on the `ready` event the engine recorded on the caller's stream at submit, sit
between the job's timing events (`start` / `done`), and a job of several plane groups (a
layer-wise load) records one event per group, which `wait_layer` hands to the caller. The engine
(kvtier.transfer.engine) only tracks jobs and orders the caller's stream against these events.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvtier.transfer.copy_job import CopyJob, EventPool
from kvtier.transfer.device_kv import DeviceKV
from kvtier.transfer.gpu_paths import GPUPaths
from kvtier.transfer.staged import StagedPath


class GPUEnqueuer:
    """The store and load streams of one GPU engine, and the enqueuing of jobs on them.
    `fail(job, exc)` records a copy's error on the job (the engine logs it)."""

    def __init__(
        self,
        dkv: DeviceKV,
        gpu: GPUPaths,
        staged: StagedPath,
        host: torch.Tensor,
        fail: Callable[[CopyJob, BaseException], None],
    ) -> None:
        self.dkv = dkv
        self.gpu = gpu
        self.staged = staged
        self.host = host
        self.fail = fail
        self.store_stream = torch.cuda.Stream(dkv.device)
        self.load_stream = torch.cuda.Stream(dkv.device)
        self.events = EventPool()

    def enqueue(
        self,
        job: CopyJob,
        blk: torch.Tensor,
        sl: torch.Tensor,
        groups: list[list[int]],
        ready: torch.cuda.Event,
    ) -> None:
        """Enqueue `job` (path "staged" or a GPUPaths path) on its direction's stream after
        `ready`. A copy that raises fails the job; `done` is recorded regardless, so a wait on
        the job still returns."""
        stream = self.store_stream if job.op == "store" else self.load_stream
        dev = self.dkv.device
        with torch.cuda.device(dev):
            stream.wait_event(ready)
            self.events.give(ready)
            with torch.cuda.stream(stream):
                job.start = self.events.take(timing=True)
                job.start.record(stream)
                try:
                    blk_dev = None  # a staged job's block ids, uploaded by its first group
                    for planes in groups:
                        if job.path == "staged":
                            ids = self.staged.run(job.op, blk, sl, planes, blk_dev, stream)
                            if ids is not blk_dev:  # kept once, however many groups read it
                                job.keep.append(ids)
                                blk_dev = ids
                        else:
                            job.keep += self.gpu.run(job.op, job.path, blk, sl, planes, self.host)
                        if len(groups) > 1:
                            ev = self.events.take()
                            ev.record(stream)
                            job.layer_events.append(ev)
                except Exception as exc:
                    self.fail(job, exc)
                job.done = self.events.take(timing=True)
                job.done.record(stream)
