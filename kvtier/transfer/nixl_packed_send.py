"""The prefill side of packed NIXL transfers (protocol in kvtier.transfer.nixl_packed).

`PackedSender.send_packed` cuts a request into chunks of the receiver's slot size
(kvtier.transfer.pack_plan), gathers chunk c into local staging slot c % K on a side stream
(ordered after the caller's current stream, which wrote the KV), WRITEs the slot into the
receiver's slot c % K with one descriptor, and gathers chunk c + 1 while that write runs. A slot
is reused only after the local write finished and the receiver said it scattered the chunk.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import torch

from kvtier.errors import ConfigError
from kvtier.transfer.handshake import HandshakeError, PeerGone, TransferError
from kvtier.transfer.nixl_endpoint import TransferReport
from kvtier.transfer.nixl_packed import Staging, byte_tensors, message, parse_message
from kvtier.transfer.nixl_transport import KVSender
from kvtier.transfer.pack_plan import chunk_bytes, chunk_plan
from kvtier.transfer.pack_rows import PackRows, kernels_for
from kvtier.transfer.registration import paired_runs


def _slot_free(writes: Mapping[int, Any], freed: set[int], chunk: int) -> bool:
    """The slot `chunk` used is free again: its write finished and the receiver scattered it."""
    return chunk not in writes and chunk in freed


class RemoteStaging(NamedTuple):
    base: int
    stride: int
    slot_bytes: int
    slots: int
    device: int


def _remote_staging(doc: Any) -> RemoteStaging | None:
    if doc is None:
        return None
    try:
        vals = [doc[k] for k in RemoteStaging._fields]
    except (KeyError, TypeError) as exc:
        raise HandshakeError(f"bad staging entry {doc!r}") from exc
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        raise HandshakeError(f"bad staging entry {doc!r}")
    st = RemoteStaging(*vals)
    if st.base <= 0 or st.slot_bytes < 1 or st.slots < 1 or st.stride < st.slot_bytes \
            or st.device < 0:
        raise HandshakeError(f"bad staging entry {doc!r}")
    return st


class PackedSender(KVSender):
    """A KVSender that can also send packed (`send_packed`) to a PackedReceiver. `tensors` are
    the engine's torch tensors (the gather indexes them). Not thread-safe."""

    def __init__(self, spec: Any, tensors: Mapping[str, torch.Tensor], fingerprint: bytes,
                 *, slots: int = 4, packed_below: int = 4 << 20, ramp: int = 0,
                 programs_per_sm: float | None = None, **kwargs: Any) -> None:
        super().__init__(spec, byte_tensors(tensors), fingerprint, **kwargs)
        self.programs_per_sm = programs_per_sm  # gather kernel grid (kvtier.transfer.pack_rows)
        self.packed_below = packed_below
        # first chunk = slot / ramp, doubling up to a slot, halving at the end (0 = flat).
        # Off by default: on 2x H200 every extra chunk cost more than the shorter first gather
        # and last scatter saved (43% vs 56% of peer copy, bench/results/pd-h200x2-*-run6.md).
        self.ramp = ramp
        self.torch_tensors = dict(tensors)
        self.device = next(iter(tensors.values())).device
        self.max_slots = slots
        self.remote_staging: RemoteStaging | None = None
        self.staging: Staging | None = None  # allocated on the first packed send
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._kernels = kernels_for(self.device)
        self._handles: dict[tuple[int, int], Any] = {}
        # seconds the last send_packed spent per phase (CPU side): where a slow request waits
        self.last_phases: dict[str, float] = {}
        # per chunk of the last send_packed, ms after its start: posted, local write seen done,
        # receiver saw the bytes (ta), scattered them (td), sender saw that (pf)
        self.last_timeline: list[dict[str, float]] = []

    def _adopt_peer(self, frame_doc: dict[str, Any], blob: bytes) -> None:
        staging = _remote_staging(frame_doc.get("staging"))
        super()._adopt_peer(frame_doc, blob)
        self._release_handles()  # prepared for an earlier peer's slots
        self.remote_staging = staging

    def _release_handles(self) -> None:
        for h in self._handles.values():
            # an aborted write may refuse release; the agent reaps it on close
            with contextlib.suppress(Exception):
                self.agent.release_xfer_handle(h)
        self._handles = {}

    def close(self) -> None:
        self._release_handles()
        if self.staging is not None:
            self.staging.close()
            self.staging = None
        super().close()

    def _local_staging(self, remote: RemoteStaging) -> Staging:
        st = self.staging
        if st is None or st.slot_bytes != remote.slot_bytes:
            if st is not None:
                st.close()
            st = Staging(self.agent, self.mem_type, self.device, remote.slot_bytes,
                         min(self.max_slots, remote.slots))
            self.staging = st
        return st

    def _handle(self, s: int, nbytes: int) -> Any:
        """A prepared WRITE of local slot s into remote slot s, `nbytes` long (cached)."""
        h = self._handles.get((s, nbytes))
        if h is None:
            assert self.staging is not None and self.remote_staging is not None
            assert self.peer is not None and self.remote_plan is not None
            st, rs = self.staging, self.remote_staging
            local = np.array([(st.base + s * st.stride, nbytes, st.device_id)], np.uint64)
            remote = np.array([(rs.base + s * rs.stride, nbytes, rs.device)], np.uint64)
            rtype = "VRAM" if self.remote_plan.regions[0].mem_type == "VRAM" else "DRAM"
            h = self.agent.initialize_xfer("WRITE", self.agent.get_xfer_descs(local, self.mem_type),
                                           self.agent.get_xfer_descs(remote, rtype),
                                           self.peer.agent)
            self._handles[(s, nbytes)] = h
        return h

    def send_auto(self, request_id: str, src_blocks: Mapping[int, Sequence[int]],
                  dst_blocks: Mapping[int, Sequence[int]],
                  timeout: float | None = None) -> TransferReport:
        """`send_packed` when the receiver has staging and the request's descriptors would
        average under `packed_below` bytes, else the direct `send`. On 2x H200 32 MiB
        descriptors moved faster direct (81% vs 52% of peer copy) and 0.5 MiB / 64 KiB ones
        packed (56% vs 12-26%, 19% vs 2-3%): bench/results/pd-h200x2-2026-11-22-run3.md."""
        if self.remote_staging is not None and self._mean_descriptor(src_blocks, dst_blocks) \
                < self.packed_below:
            return self.send_packed(request_id, src_blocks, dst_blocks, timeout)
        return self.send(request_id, src_blocks, dst_blocks, timeout)

    def _mean_descriptor(self, src: Mapping[int, Sequence[int]],
                         dst: Mapping[int, Sequence[int]]) -> float:
        """Bytes per descriptor of a direct send, from block runs (no descriptor objects)."""
        spec = self.plan.spec
        count = nbytes = 0
        for g, ids in src.items():
            if not len(ids) or g not in dst:
                continue
            split = 2 if any(t.kv_split for t in spec.tensors_of_group(g)) else 1
            count += len(paired_runs(list(ids), list(dst[g]))) * \
                len(spec.tensors_of_group(g)) * split
            nbytes += spec.request_block_bytes(g) * len(ids)
        return nbytes / count if count else float("inf")

    def _paired_blocks(self, src_blocks: Mapping[int, Sequence[int]],
                       dst_blocks: Mapping[int, Sequence[int]]
                       ) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
        """Both sides' non-empty block lists, checked: the same groups and counts, every id in
        range on its side. Raises ConfigError before anything moves."""
        assert self.remote_plan is not None
        src = {int(g): list(v) for g, v in src_blocks.items() if len(v)}
        dst = {int(g): list(v) for g, v in dst_blocks.items() if len(v)}
        if sorted(src) != sorted(dst) or any(len(src[g]) != len(dst[g]) for g in src):
            want = {g: len(v) for g, v in src.items()}
            raise ConfigError("dst_blocks", {g: len(v) for g, v in dst.items()},
                              f"as many blocks per group as src: {want}")
        self.plan.check_blocks(src)
        self.remote_plan.check_blocks(dst)
        return src, dst

    def send_packed(self, request_id: str, src_blocks: Mapping[int, Sequence[int]],
                    dst_blocks: Mapping[int, Sequence[int]],
                    timeout: float | None = None) -> TransferReport:
        """Move src_blocks into the receiver's dst_blocks through staging slots; return when
        the receiver has scattered every chunk. Raises ConfigError for bad block ids (before
        anything moves), TransferError when the receiver refuses the request, PeerGone /
        TransferTimeout when it does not answer."""
        if self.peer is None or self.remote_plan is None:
            raise TransferError("send_packed() before connect()")
        rs = self.remote_staging
        if rs is None:
            raise ConfigError("receiver", self.peer.agent, "a PackedReceiver (it has no staging)")
        start = time.monotonic()
        deadline = start + (timeout or self.timeout)
        src, dst = self._paired_blocks(src_blocks, dst_blocks)
        first = rs.slot_bytes // self.ramp if self.ramp > 1 else 0
        ps, chunks = chunk_plan(self.plan.spec, {g: len(v) for g, v in src.items()},
                                rs.slot_bytes, first)
        st = self._local_staging(rs)
        total = sum(chunk_bytes(ps, c) for c in chunks)
        begin = message("pk", request_id, fp=self.fingerprint.hex(),
                        ids={str(g): v for g, v in dst.items()}, bytes=total,
                        slot=rs.slot_bytes, first=first, n=len(chunks))
        k = st.slots
        writes: dict[int, Any] = {}  # chunk -> handle in flight
        freed: set[int] = set()
        events: dict[int, Any] = {}
        timeline: list[dict[str, float]] = [{} for _ in chunks]

        def mark(c: int, key: str, at: float | None = None) -> None:
            timeline[c][key] = round(1e3 * ((time.monotonic() if at is None else at) - start), 3)

        def poll() -> None:
            for c, h in list(writes.items()):
                state = self.agent.check_xfer_state(h)
                if state == "DONE":
                    del writes[c]
                    mark(c, "done")
                elif state != "PROC":
                    raise TransferError(f"request {request_id}: chunk {c} write {state}")
            for msgs in self.agent.get_new_notifs().values():
                for raw in msgs:
                    doc = parse_message(raw)
                    if doc is None or doc["req"] != request_id:
                        continue
                    if doc["k"] == "pe":
                        raise TransferError(f"request {request_id}: receiver refused: "
                                            f"{doc.get('why')}")
                    if doc["k"] == "pf" and 0 <= doc["c"] < len(chunks):
                        freed.add(doc["c"])
                        mark(doc["c"], "pf")
                        mark(doc["c"], "ta", doc["ta"])
                        mark(doc["c"], "td", doc["td"])

        def wait_for(ready: Callable[[], bool]) -> None:
            def polled() -> bool:
                poll()
                return ready()

            self._wait_until(polled, request_id, deadline, "receiver did not keep up")

        def gather(rows: PackRows, c: int) -> None:
            ctx = torch.cuda.stream(self._stream) if self._stream is not None else nullcontext()
            with ctx:
                rows.gather(c, (c % k) * st.stride)
                if self._stream is not None:
                    events[c] = torch.cuda.Event()
                    events[c].record(self._stream)

        ph = dict.fromkeys(("prepare", "first_gather", "gather", "sync", "post", "slot_wait",
                            "ack_wait"), 0.0)
        clock = time.perf_counter
        try:
            # announce first: the receiver builds its row tables while this side builds its own
            t_plan = time.monotonic()
            self.agent.send_notif(self.peer.agent, begin)
            t_sent = time.monotonic()
            rows = PackRows(self.torch_tensors, ps, chunks, src, self.plan.spec.num_blocks,
                            st.buf, self._kernels, self.programs_per_sm, self._stream)
            ph["prepare"] = time.monotonic() - start
            # where preparation goes: checks and plan, announcement
            ph["prep_plan"], ph["prep_announce"] = t_plan - start, t_sent - t_plan
            if self._stream is not None:  # gathers read what the caller's stream wrote
                self._stream.wait_stream(torch.cuda.current_stream(self.device))
            if chunks:
                # Each chunk's tables are built just before its gather: chunk 0's first, every
                # later one while the write before it is in flight (building them all ahead
                # delayed the first write by ~1 ms on 2x H200).
                t0 = clock()
                gather(rows, 0)
                ph["first_gather"] = clock() - t0
            for c in range(len(chunks)):
                t0 = clock()
                ev = events.pop(c, None)
                if ev is not None:
                    ev.synchronize()
                t1 = clock()
                h = self._handle(c % k, chunk_bytes(ps, chunks[c]))
                state = self.agent.transfer(h, message("pc", request_id, c=c, s=c % k))
                if state == "ERR":
                    raise TransferError(f"request {request_id}: chunk {c} write refused")
                writes[c] = h
                mark(c, "post")
                t2 = clock()
                ph["sync"] += t1 - t0
                ph["post"] += t2 - t1
                nxt = c + 1
                if nxt < len(chunks):
                    old = nxt - k  # the chunk that last used slot nxt % k
                    if old >= 0:
                        wait_for(partial(_slot_free, writes, freed, old))
                    else:
                        poll()
                    t3 = clock()
                    gather(rows, nxt)
                    ph["slot_wait"] += t3 - t2
                    ph["gather"] += clock() - t3
            t4 = clock()
            wait_for(lambda: not writes and len(freed) == len(chunks))
            ph["ack_wait"] += clock() - t4
            self.last_phases = ph
            self.last_timeline = timeline
        except TransferError:
            raise
        except Exception as exc:  # NIXL raises its own error types
            kind = TransferError if self.peer_alive() else PeerGone
            raise kind(f"request {request_id}: packed transfer failed: {exc}") from exc
        return TransferReport(request_id, total, len(chunks), time.monotonic() - start)
