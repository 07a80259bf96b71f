"""Packed NIXL transfers: gather a request's blocks into staging slots, move each slot with one
descriptor, scatter on the receiver.

Why: UCX cuda_ipc issues one copy per descriptor on one stream per peer, so per-layer caches
with scattered blocks (thousands of descriptors) moved at 3-30% of a peer copy on 2x H200
(bench/results/pd-h200x2-*). Gathering on the device costs a pass over HBM (several TB/s)
to turn N descriptors into one per slot; with `slots` >= 2 the gather of chunk c+1 and the
receiver's scatter of chunk c-1 run while chunk c crosses the link.

Protocol, NIXL notifications (JSON, validated; nothing from a peer is unpickled):
- sender -> receiver, before any data: {"v", "k": "pk", "req", "fp", "ids": {group: [dst]},
  "bytes", "slot", "first", "n"}: the request, the receiver's blocks, slot size, the chunk
  ramp (kvtier.transfer.pack_plan) and chunk count;
- sender -> receiver, attached to chunk c's WRITE (so it arrives after the bytes):
  {"v", "k": "pc", "req", "c", "s"};
- receiver -> sender once chunk c left slot s: {"v", "k": "pf", "req", "c", "s", "ta", "td"}
  (when the chunk was announced and scattered, CLOCK_MONOTONIC seconds, for timelines), or
  {"v", "k": "pe", "req", "why"} when the receiver refuses the request.
The sender reuses a slot only after its "pf"; `send_packed` returns after the last "pf", so
its time covers the receiver's scatter too. The receiver checks the fingerprint and block ids
of "pk" like a direct completion, and `wait` hands the blocks over after the last scatter.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from kvtier.errors import ConfigError
from kvtier.transfer.handshake import MAX_JSON, VERSION
from kvtier.transfer.nixl_transport import KVReceiver
from kvtier.transfer.pack_plan import Piece, Plane, chunk_plan
from kvtier.transfer.pack_rows import PackRows, kernels_for
from kvtier.transfer.registration import TensorMemory


def message(kind: str, req: str, **fields: Any) -> bytes:
    return json.dumps({"v": VERSION, "k": kind, "req": req, **fields},
                      separators=(",", ":")).encode()


def parse_message(msg: bytes) -> dict[str, Any] | None:
    """A packed-protocol message, type-checked; None for anything else."""
    if len(msg) > MAX_JSON:
        return None
    try:
        doc = json.loads(msg.decode("utf-8"))
        if doc.get("v") != VERSION or doc.get("k") not in ("pk", "pc", "pf", "pe"):
            return None
        if not isinstance(doc["req"], str):
            return None
        if doc["k"] == "pk":
            doc["ids"] = {int(g): [int(b) for b in ids] for g, ids in doc["ids"].items()}
            doc["fp"] = bytes.fromhex(doc["fp"])
            doc["bytes"], doc["slot"], doc["n"] = int(doc["bytes"]), int(doc["slot"]), int(doc["n"])
            doc["first"] = int(doc.get("first", 0))
            if doc["first"] < 0:
                return None
        elif doc["k"] in ("pc", "pf"):
            doc["c"], doc["s"] = int(doc["c"]), int(doc["s"])
            doc["ta"], doc["td"] = float(doc.get("ta", 0.0)), float(doc.get("td", 0.0))
        return dict(doc)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return None


class Staging:
    """`slots` slots of `slot_bytes` on `device`, registered with an agent once."""

    def __init__(self, agent: Any, mem_type: str, device: torch.device, slot_bytes: int,
                 slots: int) -> None:
        if slot_bytes < 1 or slots < 1:
            raise ConfigError("staging", (slot_bytes, slots), "slot_bytes >= 1 and slots >= 1")
        self.slot_bytes, self.slots = slot_bytes, slots
        self.stride = -(-slot_bytes // 256) * 256
        self.buf = torch.empty(self.stride * slots, dtype=torch.uint8, device=device)
        dev = 0 if device.type == "cpu" else int(device.index or 0)
        self.agent = agent
        self.reg = agent.register_memory([(self.base, self.buf.nbytes, dev, "")], mem_type)
        self.device_id = dev

    @property
    def base(self) -> int:
        return int(self.buf.data_ptr())

    def slot(self, s: int) -> torch.Tensor:
        return self.buf[s * self.stride : s * self.stride + self.slot_bytes]

    def close(self) -> None:
        if self.reg is not None:
            self.agent.deregister_memory(self.reg)
            self.reg = None


def byte_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorMemory]:
    return {k: TensorMemory.of(v) for k, v in tensors.items()}


@dataclass
class _Job:
    """A packed request the receiver is scattering."""

    note: dict[str, Any]
    planes: list[Plane]
    chunks: list[list[Piece]]
    rows: PackRows
    done: int = 0
    seen: set[int] = field(default_factory=set)
    last: float = field(default_factory=time.monotonic)  # last sign of progress


class PackedReceiver(KVReceiver):
    """A KVReceiver that also takes packed transfers into its staging slots. `tensors` are the
    engine's torch tensors (the scatter indexes them). Not thread-safe, like KVReceiver."""

    def __init__(self, spec: Any, tensors: Mapping[str, torch.Tensor], fingerprint: bytes, *,
                 slot_bytes: int = 128 << 20, slots: int = 4,
                 programs_per_sm: float | None = None, **kwargs: Any) -> None:
        super().__init__(spec, byte_tensors(tensors), fingerprint, **kwargs)
        self.programs_per_sm = programs_per_sm  # scatter kernel grid (kvtier.transfer.pack_rows)
        self.torch_tensors = dict(tensors)
        device = next(iter(tensors.values())).device
        self.staging = Staging(self.agent, self.mem_type, device, slot_bytes, slots)
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._kernels = kernels_for(device)
        self._jobs: dict[str, _Job] = {}
        self._early: dict[str, list[dict[str, Any]]] = {}  # chunks that beat their "pk"
        self._early_at: dict[str, float] = {}
        self._dropped: dict[str, None] = {}  # refused or abandoned: later chunks are ignored
        # (event, req, chunk, slot, monotonic time the chunk's bytes were announced)
        self._scattering: list[tuple[Any, str, int, int, float]] = []

    def _info_doc(self) -> dict[str, Any]:
        st = self.staging
        return {**super()._info_doc(), "staging": {
            "base": st.base, "stride": st.stride, "slot_bytes": st.slot_bytes,
            "slots": st.slots, "device": st.device_id}}

    def close(self) -> None:
        self.staging.close()
        super().close()

    def _busy(self) -> bool:
        # a packed sender waits for this side's acks: poll without sleeping while one is active
        return bool(self._jobs or self._scattering or self._early)

    def _drain(self) -> None:
        super()._drain()
        self._reap()
        self._expire()

    def _on_notification(self, msg: bytes) -> None:
        doc = parse_message(msg)
        if doc is None:
            super()._on_notification(msg)
        elif doc["k"] == "pk":
            self._begin(doc)
        elif doc["k"] == "pc" and doc["req"] not in self._dropped:
            job = self._jobs.get(doc["req"])
            if job is None:
                self._early.setdefault(doc["req"], []).append(doc)
                self._early_at.setdefault(doc["req"], time.monotonic())
            else:
                job.last = time.monotonic()
                self._scatter(job, doc)

    def _tell(self, msg: bytes) -> None:
        """Notify the sender; a sender that is gone shows up as PeerGone in wait(), not here."""
        if self.peer is not None:
            with contextlib.suppress(Exception):  # NIXL raises its own types on disconnect
                self.agent.send_notif(self.peer.agent, msg)

    def _expire(self) -> None:
        """Forget requests with no progress for `timeout` (a sender that died mid-request), so
        their state neither leaks nor keeps this side polling without sleep."""
        limit = time.monotonic() - self.timeout
        for req in [r for r, t in self._early_at.items() if t < limit]:
            self._drop(req)
        for req in [r for r, j in self._jobs.items() if j.last < limit]:
            self._drop(req)

    def _drop(self, req: str) -> None:
        self._jobs.pop(req, None)
        self._early.pop(req, None)
        self._early_at.pop(req, None)
        self._dropped[req] = None
        while len(self._dropped) > 4096:
            del self._dropped[next(iter(self._dropped))]

    def _refuse(self, doc: dict[str, Any], why: str) -> None:
        self._drop(doc["req"])
        self._pending[doc["req"]] = {"req": doc["req"], "error": why}
        self._tell(message("pe", doc["req"], why=why))

    def _begin(self, doc: dict[str, Any]) -> None:
        req = doc["req"]
        if doc["slot"] != self.staging.slot_bytes:
            return self._refuse(doc, f"slot size {doc['slot']} != {self.staging.slot_bytes}")
        try:
            self.plan.check_blocks(doc["ids"])
            ps, chunks = chunk_plan(self.plan.spec, {g: len(v) for g, v in doc["ids"].items()},
                                    self.staging.slot_bytes, doc["first"])
        except ConfigError as exc:
            return self._refuse(doc, str(exc))
        if len(chunks) != doc["n"]:
            return self._refuse(doc, f"{doc['n']} chunks announced, {len(chunks)} planned")
        rows = PackRows(self.torch_tensors, ps, chunks, doc["ids"], self.plan.spec.num_blocks,
                        self.staging.buf, self._kernels, self.programs_per_sm, self._stream)
        rows.build()  # now, while the sender gathers its first chunk
        # "descriptors": one per chunk; wait() need not build the direct descriptors to count
        note = {"req": req, "fp": doc["fp"], "blocks": {g: v for g, v in doc["ids"].items() if v},
                "bytes": doc["bytes"], "descriptors": len(chunks)}
        job = _Job(note, ps, chunks, rows)
        self._jobs[req] = job
        if not chunks:
            self._finish(req, job)
        self._early_at.pop(req, None)
        for early in self._early.pop(req, []):
            if req in self._jobs:  # a bad early chunk drops the job
                self._scatter(job, early)

    def _scatter(self, job: _Job, doc: dict[str, Any]) -> None:
        c, s = doc["c"], doc["s"]
        if not (0 <= c < len(job.chunks)) or not (0 <= s < self.staging.slots) or c in job.seen:
            return self._refuse(doc, f"bad chunk {c} / slot {s}")
        job.seen.add(c)
        if self._stream is not None:  # scatters overwrite blocks: after what the
            # engine's stream enqueued before
            self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))
        with torch.cuda.stream(self._stream) if self._stream is not None else nullcontext():
            job.rows.scatter(c, s * self.staging.stride)
            event = None
            if self._stream is not None:
                event = torch.cuda.Event()
                event.record(self._stream)
        self._scattering.append((event, doc["req"], c, s, time.monotonic()))

    def _reap(self) -> None:
        keep = []
        for item in self._scattering:
            event, req, c, s, seen = item
            if event is not None and not event.query():
                keep.append(item)
                continue
            # ta / td: when the chunk was announced and scattered (CLOCK_MONOTONIC, which both
            # sides of one host share), for the sender's timeline
            self._tell(message("pf", req, c=c, s=s, ta=seen, td=time.monotonic()))
            job = self._jobs.get(req)
            if job is not None:
                job.done += 1
                if job.done == len(job.chunks):
                    self._finish(req, job)
        self._scattering = keep

    def _finish(self, req: str, job: _Job) -> None:
        del self._jobs[req]
        self._pending[req] = job.note
