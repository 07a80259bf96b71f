"""Worker side: vLLM's OffloadingWorker moving pages with kvtier's CopyEngine.

vLLM hands the worker its KV caches as `CanonicalKVCaches`: per KV-cache group, one byte view
`[num_blocks, page_bytes]` per layer (layers that share memory under the hybrid allocator share
a view). Each group becomes one DeviceKV over those views and one CopyEngine on the shared host
pool. A group with fewer layers than the largest one is padded with a plane of zeros (every group
uses the same page size; loads never write it). A vLLM job may touch several groups; it is
reported finished when all of its per-group copy jobs are.

The first page of a group in a job may start inside a chunk (the GPU prefix cache already holds
the chunk's first blocks): a store reads vLLM's null block 0 for the missing positions (never
served: they lie outside every window that could load them) and a load copies only the blocks it
was given, row by row.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import torch
from vllm.v1.kv_offload.base import (
    CanonicalKVCaches,
    GPULoadStoreSpec,
    LoadStoreSpec,
    OffloadingWorker,
    TransferResult,
)

from kvtier.geometry import KVGeometry, torch_dtype
from kvtier.integrations.vllm.common import KVTierLoadStoreSpec
from kvtier.memory.host_pool import HostPool
from kvtier.transfer.device_kv import DeviceKV
from kvtier.transfer.engine import CopyEngine
from kvtier.transfer.torch_path import host_planes

log = logging.getLogger("kvtier.vllm")


@dataclass
class _VJob:
    sub: set[tuple[int, int]] = field(default_factory=set)  # (group position, engine job id)
    ok: bool = True
    nbytes: int = 0
    t0: float = field(default_factory=time.perf_counter)


def _planes_for_group(
    kv: CanonicalKVCaches, refs_idx: int, geometry: KVGeometry, runs: int, device: torch.device
) -> list[torch.Tensor]:
    """`runs` equal plane views per layer of the group (2 for K/V, 1 for an opaque block),
    padded to the page's layer count with a zero-stride plane of zeros."""
    dt = torch_dtype(geometry.dtype)
    planes: list[torch.Tensor] = []
    for ref in kv.group_data_refs[refs_idx]:
        t = kv.tensors[ref.tensor_idx].tensor  # int8 [num_blocks, padded page bytes]
        width = ref.page_size_bytes // runs
        for r in range(runs):
            planes.append(t[:, r * width : (r + 1) * width].view(dt))
    want = geometry.num_layers * geometry.kv_factor
    if len(planes) < want:
        rows = planes[0].shape[0]
        scratch = torch.zeros(planes[0].shape[1], dtype=dt, device=device)
        planes += [scratch.expand(rows, -1)] * (want - len(planes))
    return planes


class KVTierOffloadingWorker(OffloadingWorker):
    """One CopyEngine per KV-cache group over one shared HostPool.

    `canonical`: the block is `[2][block_size][H][D]`, so K and V become separate planes and
    pages are kvtier's canonical blobs; otherwise each layer's block is one opaque plane.
    """

    def __init__(
        self,
        kv_caches: CanonicalKVCaches,
        pool: HostPool,
        page: KVGeometry,
        block_size: int,
        *,
        canonical: bool,
    ) -> None:
        self.pool = pool
        self.page = page
        self.block_size = block_size
        self.bpp = page.page_size // block_size
        device = kv_caches.tensors[0].tensor.device
        runs = 2 if canonical else 1
        layers = page.num_layers
        geo = KVGeometry(
            layers,
            1,
            page.page_bytes // (layers * runs * page.page_size * page.itemsize),
            page.page_size,
            page.dtype,
            mla=not canonical,  # one opaque plane per layer: kv_factor 1
        )
        self.dkvs: list[DeviceKV] = []
        self.engines: list[CopyEngine] = []
        for gi in range(len(kv_caches.group_data_refs)):
            planes = _planes_for_group(kv_caches, gi, geo, runs, device)
            dkv = DeviceKV.from_planes(planes, geo, block_size)
            real = len(kv_caches.group_data_refs[gi]) * runs
            if real < len(planes):
                # Padding planes are read on store (zeros) but never written on load: marking
                # them aliases of plane 0 takes them out of DeviceKV.write_planes().
                alias = dkv.alias_of[:real] + (0,) * (len(planes) - real)
                dkv = dataclasses.replace(dkv, alias_of=alias)
            self.dkvs.append(dkv)
            self.engines.append(CopyEngine(dkv, pool))
        self._host = host_planes(pool, self.dkvs[0])
        self._jobs: dict[int, _VJob] = {}
        self._owner: dict[tuple[int, int], int] = {}
        self._done: list[TransferResult] = []

    # -- spec decoding -----------------------------------------------------------------------
    def _split(
        self, gpu: GPULoadStoreSpec, host: KVTierLoadStoreSpec
    ) -> list[tuple[int, list[list[int]], list[int], int]]:
        """Per group: (group position, blocks per page, slots, leading blocks missing)."""
        sizes = list(gpu.group_sizes)
        out = []
        pos = 0
        block_ids = [int(b) for b in gpu.block_ids]
        for gi, n in enumerate(sizes):
            blocks = block_ids[pos : pos + n]
            pos += n
            slots = [s for s, g in zip(host.slots, host.groups) if g == gi]
            if not slots or not blocks:
                continue
            skip = self.bpp * len(slots) - n
            if skip < 0 or skip >= self.bpp:
                raise ValueError(f"group {gi}: {n} blocks for {len(slots)} pages of {self.bpp}")
            padded = [0] * skip + blocks
            pages = [padded[i * self.bpp : (i + 1) * self.bpp] for i in range(len(slots))]
            out.append((gi, pages, slots, skip))
        return out

    # -- OffloadingWorker --------------------------------------------------------------------
    def submit_store(
        self, job_id: int, src_spec: GPULoadStoreSpec, dst_spec: LoadStoreSpec
    ) -> bool:
        assert isinstance(dst_spec, KVTierLoadStoreSpec)
        job = self._jobs.setdefault(job_id, _VJob())
        try:
            for gi, pages, slots, _ in self._split(src_spec, dst_spec):
                sub = self.engines[gi].submit_store(pages, slots)
                job.sub.add((gi, sub))
                self._owner[(gi, sub)] = job_id
        except Exception as exc:  # malformed spec: fail the job, never the engine
            log.warning("kvtier store job %d failed at submit: %s", job_id, exc)
            job.ok = False
        self._maybe_finish(job_id)
        return True

    def submit_load(
        self, job_id: int, src_spec: LoadStoreSpec, dst_spec: GPULoadStoreSpec
    ) -> bool:
        assert isinstance(src_spec, KVTierLoadStoreSpec)
        job = self._jobs.setdefault(job_id, _VJob())
        try:
            for gi, pages, slots, skip in self._split(dst_spec, src_spec):
                if skip:
                    self._load_partial(gi, slots[0], pages[0], skip)
                    pages, slots = pages[1:], slots[1:]
                if slots:
                    sub = self.engines[gi].submit_load(slots, pages)
                    job.sub.add((gi, sub))
                    self._owner[(gi, sub)] = job_id
        except Exception as exc:
            log.warning("kvtier load job %d failed at submit: %s", job_id, exc)
            job.ok = False
        self._maybe_finish(job_id)
        return True

    def _load_partial(self, gi: int, slot: int, blocks: list[int], skip: int) -> None:
        """Copy blocks[skip:] of the page in `slot` (the rest is already on the device)."""
        dkv = self.dkvs[gi]
        be = dkv.block_elems
        host = self._host[slot]
        for p in dkv.write_planes():
            plane = dkv.planes[p]
            src = host[p].view(plane.dtype) if host.dtype != plane.dtype else host[p]
            for j in range(skip, self.bpp):
                plane[blocks[j]].copy_(src[j * be : (j + 1) * be])

    def _collect(self) -> None:
        for gi, eng in enumerate(self.engines):
            for res in eng.poll():
                vjob_id = self._owner.pop((gi, res.job_id), None)
                if vjob_id is None:
                    continue
                job = self._jobs[vjob_id]
                job.sub.discard((gi, res.job_id))
                job.ok &= res.success
                job.nbytes += res.nbytes
                self._maybe_finish(vjob_id)

    def _maybe_finish(self, job_id: int) -> None:
        job = self._jobs[job_id]
        if job.sub:
            return
        del self._jobs[job_id]
        seconds = time.perf_counter() - job.t0
        self._done.append(TransferResult(job_id, job.ok, job.nbytes, seconds))

    def get_finished(self) -> list[TransferResult]:
        self._collect()
        out, self._done = self._done, []
        return out

    def wait(self, job_ids: set[int]) -> None:
        for job_id in job_ids:
            job = self._jobs.get(job_id)
            if job is None:
                continue
            for gi, sub in list(job.sub):
                res = self.engines[gi].wait(sub)
                self._owner.pop((gi, sub), None)
                job.sub.discard((gi, sub))
                job.ok &= res.success
                job.nbytes += res.nbytes
            self._maybe_finish(job_id)

    def shutdown(self) -> None:
        for eng in self.engines:
            eng.close()

