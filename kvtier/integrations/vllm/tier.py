"""kvtier's secondary tiers (disk, Redis/Valkey, Mooncake, NIXL) behind vLLM's own tiering hook.

vLLM's TieringOffloadingSpec keeps its CPU tier and cascades to secondary tiers loaded by module
path; this adapter is one of them:

    "secondary_tiers": [{"type": "KVTierSecondaryTier",
                         "module_path": "kvtier.integrations.vllm.tier",
                         "kind": "disk", "path": "/var/tmp/kvtier", "budget": "50GiB"}]

Every option but `type`, `module_path`, `kind` and `name` goes to the kvtier tier's factory.
vLLM's CPU chunk is stored as one kvtier page blob (header with namespace fingerprint, key and
checksum, then the chunk's bytes), so a damaged or foreign file is a miss, never wrong KV.
Stores seal a copy of the chunk on the scheduler thread (one memcpy and a checksum per chunk);
the tier's I/O runs on its own threads; loads land in a staging blob and are copied into the
CPU chunk when the job is reported.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from vllm.v1.kv_offload.base import (
    Locality,
    LookupResult,
    Medium,
    OffloadingEvent,
    OffloadKey,
    ReqContext,
    RequestOffloadingContext,
)
from vllm.v1.kv_offload.tiering.base import JobResult, SecondaryTierManager, TransferJob

from kvtier.geometry import KVGeometry
from kvtier.keys import HEADER_SIZE, Namespace, PageKey, key_from_engine_hash, pack
from kvtier.tiers.base import TierContext
from kvtier.tiers.registry import make_tier

log = logging.getLogger("kvtier.vllm")


@dataclass
class _Job:
    job_id: int
    load: bool
    keys: list[OffloadKey]
    ours: list[PageKey]
    chunk_ids: list[int]
    blobs: list[bytearray]


class KVTierSecondaryTier(SecondaryTierManager):
    """A kvtier SecondaryTier as a vLLM SecondaryTierManager (scheduler process only)."""

    medium = Medium.STORAGE

    def __init__(
        self,
        offloading_spec: Any,
        primary_kv_view: memoryview,
        tier_type: str,
        backpressure_detector: Any = None,
        *,
        kind: str = "disk",
        name: str | None = None,
        locality: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__(offloading_spec, primary_kv_view, tier_type, backpressure_detector)
        self.locality = Locality(locality) if locality else (
            Locality.LOCAL if kind == "disk" else Locality.REMOTE
        )
        self.name = name or kind
        self._primary = np.asarray(primary_kv_view).reshape(len(primary_kv_view), -1)
        chunk = self.block_size_bytes
        cfg = offloading_spec.config
        # The chunk is opaque to kvtier: one "latent" of chunk bytes; the namespace names the
        # engine, its chunking and the model so that no other writer's pages are ever served.
        self.namespace = Namespace(
            model_id=str(options.pop("model_id", cfg.model.name)),
            geometry=KVGeometry(1, 1, chunk, 1, "uint8", mla=True),
            extra=(
                ("engine", "vllm-cpu-tier"),
                ("dtype", str(cfg.model.dtype)),
                ("blocks_per_chunk", str(cfg.cache.blocks_per_chunk)),
                ("tokens_per_block", ",".join(str(g.tokens_per_block) for g in cfg.groups)),
            ),
        )
        self.tier = make_tier(kind, self.name, options, TierContext(self.namespace.fingerprint,
                                                                    chunk))  # fmt: skip
        self._jobs: dict[int, _Job] = {}  # kvtier job id -> job
        self._failed: list[JobResult] = []
        self._storing: set[PageKey] = set()
        self._vkey: dict[PageKey, OffloadKey] = {}
        self._events: list[OffloadingEvent] = []

    def _key(self, key: OffloadKey) -> PageKey:
        k = key_from_engine_hash(self.namespace, bytes(key))
        self._vkey[k] = key
        return k

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        k = self._key(key)
        if k in self._storing:
            return LookupResult.RETRY
        return LookupResult.HIT if self.tier.contains([k])[0] else LookupResult.MISS

    def submit_store(self, job_metadata: TransferJob) -> None:
        keys = list(job_metadata.keys)
        ours = [self._key(k) for k in keys]
        ids = [int(c) for c in job_metadata.chunk_ids]
        fp = self.namespace.fingerprint
        blobs = [bytearray(pack(fp, k, self._primary[c].tobytes())) for k, c in zip(ours, ids)]
        job = _Job(job_metadata.job_id, False, keys, ours, ids, blobs)
        self._submit(job)

    def submit_load(self, job_metadata: TransferJob) -> None:
        keys = list(job_metadata.keys)
        ours = [self._key(k) for k in keys]
        ids = [int(c) for c in job_metadata.chunk_ids]
        blobs = [bytearray(HEADER_SIZE + self.block_size_bytes) for _ in keys]
        self._submit(_Job(job_metadata.job_id, True, keys, ours, ids, blobs))

    def _submit(self, job: _Job) -> None:
        items = [(k, memoryview(b)) for k, b in zip(job.ours, job.blobs)]
        tid = self.tier.submit_load(items) if job.load else self.tier.submit_store(items)
        if tid is None:  # back-pressure: the whole job fails now, nothing is held
            self._failed.append(JobResult(job.job_id, False, successful_keys=[]))
            return
        if not job.load:
            self._storing.update(job.ours)
        self._jobs[tid] = job

    def get_finished_jobs(self) -> Iterable[JobResult]:
        self._collect()
        out, self._failed = self._failed, []
        return out

    def drain_jobs(self) -> None:
        deadline = time.monotonic() + 120.0
        while self._jobs and time.monotonic() < deadline:
            self._collect()
            if self._jobs:
                time.sleep(0.001)
        if self._jobs:  # a tier that never answers: report its jobs failed, forget them
            log.warning("kvtier tier %s: %d jobs did not finish", self.name, len(self._jobs))
            for job in self._jobs.values():
                self._failed.append(JobResult(job.job_id, False, successful_keys=[]))
                self._storing.difference_update(job.ours)
            self._jobs.clear()

    def _collect(self) -> None:
        out = self._failed
        for res in self.tier.poll():
            job = self._jobs.pop(res.job_id, None)
            if job is None:
                continue
            ok = set(res.ok)
            done = [i for i, k in enumerate(job.ours) if k in ok]
            if job.load:
                for i in done:
                    payload = np.frombuffer(job.blobs[i], np.uint8, offset=HEADER_SIZE)
                    self._primary[job.chunk_ids[i]] = payload
            else:
                self._storing.difference_update(job.ours)
                if done:
                    self._events.append(self._event([job.keys[i] for i in done], False))
            out.append(
                JobResult(
                    job.job_id,
                    len(done) == len(job.ours),
                    successful_keys=[job.keys[i] for i in done] if job.load else None,
                    transfer_time=res.seconds,
                    transfer_bytes=len(done) * self.block_size_bytes,
                )
            )

    def has_pending_work(self) -> bool:
        return bool(self._jobs or self._failed)

    def _event(self, keys: list[OffloadKey], removed: bool) -> OffloadingEvent:
        return OffloadingEvent(keys, Medium.STORAGE, removed=removed, locality=self.locality,
                               ownership=self.name)  # fmt: skip

    def take_events(self) -> Iterable[OffloadingEvent]:
        gone = [self._vkey.pop(k) for k in self.tier.take_removed() if k in self._vkey]
        if gone:
            self._events.append(self._event(gone, True))
        out, self._events = self._events, []
        return out

    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        return  # kvtier's lower tiers keep their own recency

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def shutdown(self) -> None:
        self.tier.close()
