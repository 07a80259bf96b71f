"""The prefill side's fastest path on one host: write the blocks into the peer's mapped memory.

`IpcSender` is a PackedSender that, when the receiver offered its KV memory for CUDA IPC
(kvtier.transfer.cuda_ipc) and that memory is reachable from this GPU, copies a request's rows
with one kernel straight into the receiver's blocks (kvtier.transfer.peer_rows), waits for the
kernel, then sends the same completion notification a direct NIXL transfer ends with, over
NIXL. The receiver's `wait` cannot tell the two apart: its blocks hold the data before the
notification leaves. Everything else (another host, no peer access, memory legacy IPC cannot
export, no Triton) goes over NIXL as before; `ipc_unused` says why.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kvtier.transfer.cuda_ipc import Offer, PeerMemory, open_offer, parse_offer
from kvtier.transfer.handshake import HandshakeError, PeerGone, TransferError, notification
from kvtier.transfer.nixl_endpoint import TransferReport
from kvtier.transfer.nixl_packed_send import PackedSender
from kvtier.transfer.peer_rows import PeerRows


class IpcSender(PackedSender):
    """A PackedSender with `send_ipc`, which `send_auto` prefers when it is available.
    `ipc=False` never maps the peer's memory. Not thread-safe."""

    def __init__(self, spec: Any, tensors: Mapping[str, torch.Tensor], fingerprint: bytes,
                 *, ipc: bool = True, ipc_programs_per_sm: float | None = None,
                 ipc_spread: bool = False, ipc_graphs: bool = True, **kwargs: Any) -> None:
        super().__init__(spec, tensors, fingerprint, **kwargs)
        self.ipc_enabled = ipc
        # the copy kernel's grid and tile order, and whether repeated request shapes replay a
        # captured CUDA graph (kvtier.transfer.peer_rows)
        self.ipc_programs_per_sm, self.ipc_spread = ipc_programs_per_sm, ipc_spread
        self.ipc_graphs = ipc_graphs
        self._events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None  # began, done
        self.peer_memory: PeerMemory | None = None
        self.peer_rows: PeerRows | None = None
        self.ipc_unused = "not connected"

    def _adopt_peer(self, frame_doc: dict[str, Any], blob: bytes) -> None:
        super()._adopt_peer(frame_doc, blob)
        self._unmap()
        assert self.remote_plan is not None and self.peer is not None
        try:
            peer_offer = parse_offer(frame_doc.get("ipc"), self.remote_plan.regions)
        except HandshakeError:
            with contextlib.suppress(Exception):
                self.agent.remove_remote_agent(self.peer.agent)
            self.peer = self.remote_plan = None
            raise
        self.ipc_unused = self._map(peer_offer)

    def _map(self, peer_offer: Offer | None) -> str:
        """Map the peer's offer; '' when send_ipc can run, else why not."""
        if not self.ipc_enabled:
            return "disabled"
        if self.device.type != "cuda" or self._kernels is None:
            return "needs a CUDA device and Triton"
        if peer_offer is None:
            return "the receiver offered no IPC memory"
        mem = open_offer(peer_offer, int(self.device.index or 0))
        if mem is None:
            return "the receiver's memory is not reachable from this GPU"
        assert self.remote_plan is not None
        dst = {}
        for t in self.plan.spec.tensors:
            region, start = self.remote_plan.place(t.name)
            dst[t.name] = mem.base(region) + start
        self.peer_memory = mem
        self.peer_rows = PeerRows(self.plan.spec, self.torch_tensors, dst, self._kernels,
                                  self.ipc_programs_per_sm, self.ipc_spread, self.ipc_graphs)
        return ""

    def _unmap(self) -> None:
        self.peer_rows = None
        if self.peer_memory is not None:
            self.peer_memory.close()
            self.peer_memory = None

    def close(self) -> None:
        if self.peer_memory is not None and self._stream is not None:
            self._stream.synchronize()  # no copy may still write into memory being unmapped
        self._unmap()
        super().close()

    def send_auto(self, request_id: str, src_blocks: Mapping[int, Sequence[int]],
                  dst_blocks: Mapping[int, Sequence[int]],
                  timeout: float | None = None) -> TransferReport:
        """`send_ipc` where the peer's memory is mapped, else PackedSender.send_auto."""
        if self.peer_rows is not None:
            return self.send_ipc(request_id, src_blocks, dst_blocks, timeout)
        return super().send_auto(request_id, src_blocks, dst_blocks, timeout)

    def send_ipc(self, request_id: str, src_blocks: Mapping[int, Sequence[int]],
                 dst_blocks: Mapping[int, Sequence[int]],
                 timeout: float | None = None) -> TransferReport:
        """Copy src_blocks into the receiver's dst_blocks through its mapped memory, after
        the caller's current stream (which wrote the KV); return once the copy has finished
        and the receiver has been told. Raises ConfigError for bad block ids (before anything
        moves), TransferError when IPC is not available (`ipc_unused`), PeerGone when the
        receiver left, TransferTimeout when the copy does not finish in time."""
        if self.peer is None or self.remote_plan is None:
            raise TransferError("send_ipc() before connect()")
        rows = self.peer_rows
        if rows is None:
            raise TransferError(f"no IPC path to {self.peer.agent}: {self.ipc_unused}")
        start = time.monotonic()
        deadline = start + (timeout or self.timeout)
        src, dst = self._paired_blocks(src_blocks, dst_blocks)
        if not self.peer_alive():  # its memory may be gone with it
            raise PeerGone(f"request {request_id}: receiver gone before the copy")
        stream = self._stream
        assert stream is not None
        if self._events is None:  # kept: creating events per request costs CPU too
            self._events = (torch.cuda.Event(enable_timing=True),
                            torch.cuda.Event(enable_timing=True))
        began, done = self._events
        t_checked = time.monotonic()
        with torch.cuda.device(self.device):
            stream.wait_stream(torch.cuda.current_stream(self.device))
            began.record(stream)
            t_ordered = time.monotonic()
            with torch.cuda.stream(stream):
                nbytes = rows.copy(src, dst)
            t_enqueued = time.monotonic()
            done.record(stream)
        t_launched = time.monotonic()
        self._wait_until(done.query, request_id, deadline, "copy not done")
        t_copied = time.monotonic()
        if not self.peer_alive():
            raise PeerGone(f"request {request_id}: receiver left during the copy")
        try:
            self.agent.send_notif(self.peer.agent,
                                  notification(request_id, self.fingerprint, dst, nbytes, 0))
        except Exception as exc:  # NIXL raises its own error types
            raise PeerGone(f"request {request_id}: cannot notify the receiver: {exc}") from exc
        end = time.monotonic()
        # where a request's time goes (seconds): checks; launch = order (after the caller's
        # stream) + enqueue (tables and kernels, or a graph replay) + record; wait (until the
        # copy finished), kernel (GPU time of the copy), notify
        self.last_phases = {"checks": t_checked - start, "launch": t_launched - t_checked,
                            "order": t_ordered - t_checked, "enqueue": t_enqueued - t_ordered,
                            "record": t_launched - t_enqueued, "wait": t_copied - t_launched,
                            "kernel": began.elapsed_time(done) / 1e3, "notify": end - t_copied}
        return TransferReport(request_id, nbytes, 0, end - start)
