"""The copy engine: asynchronous page stores (device -> host slots) and loads (host -> device).

A job moves whole pages: page i is made of the engine blocks `blocks[i]` (page_size //
block_size of them) and lives in host slot `slots[i]` as a canonical PAGE_FIRST payload. A
store defines its slots' payloads only: the staged path moves pages in consecutive slots as
one copy, which also writes the padding and header bytes between them (the owner writes a
slot's header after its store, when sealing it). Other slots are never touched.

Ordering on a GPU. A store runs on the engine's store stream, which first waits on an event
recorded on the caller's current stream at submit: it never reads a block the compute stream is
still writing. A load runs on a separate load stream (stores and loads overlap: PCIe is full
duplex), also ordered after the caller's stream at submit so it never overwrites a block still
being read. Nothing may read a loaded block before the load lands: `wait_layer` / `wait` make
the caller's current stream wait for it (per layer for `layerwise=True` loads, so layer i+1 lands
while layer i computes).

Path "staged" (kvtier.transfer.staged) cuts large jobs into chunks that are gathered into a
device staging buffer and DMAed by the copy engines, pipelined; "auto" takes it for jobs of at
least `thresholds.staged.min_job_bytes`. On CPU tensors it runs the same chunking with tensor
copies (that is how it is tested without a GPU).

On the CPU (path "cpu" or "staged") jobs run synchronously inside submit (on the direction's
submit thread with `submit_threads`); the job API is the same.
A copy that fails at run time completes as `success=False` (the cache above counts a miss and
never serves that page); it is logged once per distinct error, never raised from poll/wait.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Sequence

import torch

from kvtier.errors import ConfigError
from kvtier.memory.host_pool import HostPool
from kvtier.transfer.copy_job import CopyJob, TransferResult
from kvtier.transfer.cpu_rows import RowCopier
from kvtier.transfer.device_kv import DeviceKV
from kvtier.transfer.gpu_enqueue import GPUEnqueuer
from kvtier.transfer.gpu_paths import GPUPaths
from kvtier.transfer.job_args import normalize_job_args
from kvtier.transfer.staged_plan import plane_runs
from kvtier.transfer.staged_setup import make_staged
from kvtier.transfer.submit_worker import SubmitWorker
from kvtier.transfer.thresholds import Thresholds
from kvtier.transfer.torch_path import host_planes

log = logging.getLogger(__name__)

ENGINE_PATHS = ("auto", "cpu", "torch", "triton", "dma", "staged")
_CPU_PATHS = ("auto", "cpu", "staged")


@functools.lru_cache(maxsize=64)
def _shortest_run(groups: tuple[tuple[int, ...], ...]) -> int:
    """Planes in the shortest run of consecutive planes of any group (cached: a job's groups
    repeat, and a submit is on its copies' critical path)."""
    return min(k for gr in groups if gr for _, k in plane_runs(sorted(gr)))


class CopyEngine:
    """Moves pages between `device_kv` and `host_pool` slots. Thread-safe (one internal lock).

    `path`: "auto" (CPU tensors: "cpu"; GPU: "staged" for large jobs, else Triton or batched DMA
    per job by the measured thresholds, torch when neither is available), or one of "cpu",
    "torch", "triton", "dma", "staged" (the last also on CPU tensors).
    `load_path` (GPU only; default: `path`) picks loads' path on its own, e.g. Triton stores
    beside copy-engine ("torch") loads, so the two directions use different hardware.
    `submit_threads`: submit only records the ordering event and queues the job; one thread per
    direction enqueues (GPU) or runs (CPU) the copies, in submit order (kvtier.transfer.
    submit_worker). Results, ordering and errors are the same as without.
    Raises ConfigError when the path cannot run here or the pool does not fit the geometry.
    """

    def __init__(
        self,
        device_kv: DeviceKV,
        host_pool: HostPool,
        *,
        path: str = "auto",
        thresholds: Thresholds | None = None,
        load_path: str | None = None,
        submit_threads: bool = False,
    ) -> None:
        if path not in ENGINE_PATHS:
            raise ConfigError("transfer.path", path, ENGINE_PATHS)
        if load_path is not None and load_path not in ENGINE_PATHS:
            raise ConfigError("transfer.load_path", load_path, ENGINE_PATHS)
        g = device_kv.geometry
        if host_pool.payload_bytes != g.page_bytes:
            raise ConfigError(
                "host.payload_bytes", host_pool.payload_bytes, f"page_bytes {g.page_bytes}"
            )
        self.dkv = device_kv
        self.pool = host_pool
        self.on_gpu = device_kv.device.type == "cuda"
        if not self.on_gpu and path not in _CPU_PATHS:
            raise ConfigError("transfer.path", path, "'auto', 'cpu' or 'staged' for CPU tensors")
        if self.on_gpu and path == "cpu":
            raise ConfigError("transfer.path", path, "a GPU path for CUDA tensors")
        if self.on_gpu and not host_pool.pinned:
            raise ConfigError("host.pin", False, "a pinned host pool for GPU transfers")
        if not self.on_gpu and load_path not in (None, *_CPU_PATHS):
            raise ConfigError(
                "transfer.load_path", load_path, "'auto', 'cpu' or 'staged' for CPU tensors"
            )
        cpu_path = "staged" if path == "staged" else "cpu"
        self.path = cpu_path if not self.on_gpu else path
        if self.on_gpu:
            self.load_path = load_path or path
        else:
            self.load_path = "staged" if (load_path or path) == "staged" else "cpu"
        th = thresholds or Thresholds.read()
        self.thresholds = th
        self._host = host_planes(host_pool, device_kv)
        self._lock = threading.Lock()
        self._next_id = 1
        self._pending: dict[int, CopyJob] = {}
        self._logged: set[str] = set()
        self._gpu: GPUPaths | None = None
        self._rows = None if self.on_gpu else RowCopier(device_kv, self._host)
        if self.on_gpu:
            self._gpu = GPUPaths(device_kv, host_pool, th)
            for field_, p in (("transfer.path", path), ("transfer.load_path", self.load_path)):
                ok = p in ("auto", "torch", "staged") or self._gpu.available(p)
                if p == "cpu" or not ok:
                    raise ConfigError(field_, p, "an available GPU path (triton/dma/torch)")
        self._staged = make_staged(device_kv, host_pool, th.staged, self._gpu)
        self._enqueuer: GPUEnqueuer | None = None
        if self._gpu is not None:
            self._enqueuer = GPUEnqueuer(device_kv, self._gpu, self._staged, self._host, self._fail)
        self._workers: dict[str, SubmitWorker] = {}
        if submit_threads:
            self._workers = {op: SubmitWorker(f"kvtier-{op}") for op in ("store", "load")}

    def _auto_staged(self, n_pages: int, groups: list[list[int]]) -> bool:
        """Whether "auto" takes the staged path: a large job whose per-page host runs are long
        (a layer-wise load of many layers has short runs and stays on the Triton kernel)."""
        st = self.thresholds.staged
        plane_bytes = self.dkv.blocks_per_page * self.dkv.block_bytes
        total = n_pages * sum(len(gr) for gr in groups) * plane_bytes
        if total < st.min_job_bytes or not any(groups):
            return False
        return _shortest_run(tuple(map(tuple, groups))) * plane_bytes >= st.min_run_bytes

    # -- submit ------------------------------------------------------------------------------
    def submit_store(
        self, blocks: Sequence[Sequence[int]] | torch.Tensor, slots: Sequence[int]
    ) -> int:
        """Copy the pages made of `blocks` into host slots `slots` (blocks[i] -> slots[i]).
        Returns the job id. Raises ValueError on malformed or out-of-range input."""
        blk, sl = normalize_job_args(blocks, slots, self.dkv, self.pool, write=True)
        planes = list(range(self.dkv.num_planes))
        return self._submit("store", blk, sl, [planes])

    def submit_load(
        self,
        slots: Sequence[int],
        blocks: Sequence[Sequence[int]] | torch.Tensor,
        *,
        layerwise: bool = False,
    ) -> int:
        """Copy host slots `slots` into the engine blocks `blocks` (slots[i] -> blocks[i]).
        With `layerwise`, layer l completes as its own step (see wait_layer)."""
        blk, sl = normalize_job_args(blocks, slots, self.dkv, self.pool, write=False)
        g = self.dkv.geometry
        if layerwise and (self.on_gpu or self.load_path == "staged"):
            groups = [self.dkv.write_planes(range(lay, lay + 1)) for lay in range(g.num_layers)]
        else:
            groups = [self.dkv.write_planes()]
        return self._submit("load", blk, sl, groups)

    def _new_id(self) -> int:
        with self._lock:
            job_id = self._next_id
            self._next_id += 1
            return job_id

    def _fail(self, job: CopyJob, exc: BaseException) -> None:
        job.error = f"{type(exc).__name__}: {exc}"
        key = f"{job.op}:{job.path}:{type(exc).__name__}"
        if key not in self._logged:
            self._logged.add(key)
            log.warning("kvtier copy %s via %s failed: %s", job.op, job.path, job.error)

    def _submit(self, op: str, blk: torch.Tensor, sl: torch.Tensor, groups: list[list[int]]) -> int:
        job_id = self._new_id()
        chunk_bytes = self.dkv.blocks_per_page * self.dkv.block_bytes
        nbytes = int(sl.numel()) * sum(len(gr) for gr in groups) * chunk_bytes
        path = self.path if op == "store" else self.load_path
        if self._gpu is not None and path == "auto":
            staged = self._auto_staged(int(sl.numel()), groups)
            path = "staged" if staged else self._gpu.choose(op, int(sl.numel()))
        job = CopyJob(job_id, op, nbytes, path, t0=time.perf_counter())
        ready = None
        if self._gpu is not None:  # the copies are ordered after what the caller enqueued so far
            assert self._enqueuer is not None
            ready = self._enqueuer.events.take()
            ready.record(torch.cuda.current_stream(self.dkv.device))
        with self._lock:
            self._pending[job_id] = job
        worker = self._workers.get(op)
        if worker is None:
            self._run(job, blk, sl, groups, ready)
        else:
            worker.put(lambda: self._run(job, blk, sl, groups, ready))
        return job_id

    def _run(
        self,
        job: CopyJob,
        blk: torch.Tensor,
        sl: torch.Tensor,
        groups: list[list[int]],
        ready: torch.cuda.Event | None,
    ) -> None:
        try:
            if ready is None:
                self._run_cpu(job, blk, sl, groups)
            else:
                assert self._enqueuer is not None
                self._enqueuer.enqueue(job, blk, sl, groups, ready)
        except Exception as exc:  # a failed job, never a dead submit thread or a hung wait()
            self._fail(job, exc)
        finally:
            job.enqueued.set()

    def _run_cpu(
        self, job: CopyJob, blk: torch.Tensor, sl: torch.Tensor, groups: list[list[int]]
    ) -> None:
        t0 = time.perf_counter()
        try:
            if job.path == "staged":
                for planes in groups:
                    self._staged.run(job.op, blk, sl, planes)
            elif job.op == "store":
                assert self._rows is not None
                self._rows.store(blk, sl)
            else:
                assert self._rows is not None
                self._rows.load(sl, blk, groups[0])
        except Exception as exc:  # a run-time fault becomes a failed job, never a crash
            self._fail(job, exc)
        job.wall = time.perf_counter() - t0

    # -- completion --------------------------------------------------------------------------
    def poll(self) -> list[TransferResult]:
        """Jobs finished since the last poll (or wait), each reported once, by job id."""
        with self._lock:
            out = []
            for job_id, job in list(self._pending.items()):
                if job.finished_now():
                    del self._pending[job_id]
                    out.append(self._report(job))
        return sorted(out, key=lambda r: r.job_id)

    def wait_layer(self, job_id: int, layer: int) -> None:
        """Make the caller's current CUDA stream wait until layer `layer` of load `job_id` has
        landed (the whole job for non-layerwise loads). Returns once the job is enqueued; no-op
        on the CPU and for jobs already reported finished."""
        with self._lock:
            job = self._pending.get(job_id)
        if job is None:
            return
        job.enqueued.wait()
        events, done = job.layer_events, job.done  # a report meanwhile replaces both
        # a job that failed part-way has fewer layer events: its end covers every layer
        ev = events[layer] if layer < len(events) else done
        if ev is not None:  # None: a CPU job, or reported since
            torch.cuda.current_stream(self.dkv.device).wait_event(ev)

    def wait(self, job_id: int, timeout: float | None = None) -> TransferResult:
        """Block until job `job_id` finishes and return its result (it is then not returned by
        poll). The caller's current stream is also ordered after the job. Raises KeyError for
        an unknown or already reported job, TimeoutError when `timeout` seconds pass first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            job = self._pending.get(job_id)
        if job is None:
            raise KeyError(f"no pending transfer job {job_id}")
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not job.enqueued.wait(left):
            raise TimeoutError(f"transfer job {job_id} still queued after {timeout}s")
        done = job.done  # a concurrent poll may report the job and recycle its events
        if done is not None:
            if deadline is None:
                done.synchronize()
            else:
                while not done.query():
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"transfer job {job_id} still running after {timeout}s")
                    time.sleep(50e-6)
            torch.cuda.current_stream(self.dkv.device).wait_event(done)
        with self._lock:
            if self._pending.pop(job_id, None) is None:
                raise KeyError(f"transfer job {job_id} was reported by poll meanwhile")
        return self._report(job)

    def _report(self, job: CopyJob) -> TransferResult:
        """`job`'s result; its events go back to the pool (nothing reads them after this)."""
        result = job.result()
        if self._enqueuer is not None:
            self._enqueuer.events.give_job(job)
        return result

    def close(self) -> None:
        """Wait for every job in flight and stop the submit threads; pending results stay
        available to poll."""
        for worker in self._workers.values():
            worker.close()
        with self._lock:
            jobs = list(self._pending.values())
        for job in jobs:
            done = job.done
            if done is not None:
                done.synchronize()
