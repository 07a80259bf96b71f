"""Move a finished request's KV blocks from a prefill instance into a decode instance (NIXL).

The decode side (`KVReceiver`) registers its KV regions, listens on a TCP port and accepts a
prefill peer only after the peer's namespace fingerprint matches; only then does it send the NIXL
metadata that lets the peer write into its memory. The prefill side (`KVSender`) WRITEs its
blocks into the receiver's blocks with one descriptor per tensor and contiguous block run, and
attaches a notification naming the request, the fingerprint and the blocks. `KVReceiver.wait`
hands blocks over only when that notification arrived and matches what was expected.

Every wait has a deadline; a dead peer yields PeerGone or TransferTimeout, never a hang. UCX is
the backend: DRAM over TCP/shared memory on CPU, VRAM over cuda_ipc/NVLink on GPUs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from kvtier.errors import ConfigError
from kvtier.geometry.groups import KVCacheSpec
from kvtier.transfer.cuda_ipc import offer
from kvtier.transfer.handshake import (
    ACCEPT,
    HELLO,
    REJECT,
    FingerprintMismatch,
    HandshakeError,
    PeerGone,
    TransferError,
    TransferTimeout,
    notification,
    parse_notification,
    recv_frame,
    send_frame,
)
from kvtier.transfer.nixl_endpoint import (
    NixlEndpoint,
    PreparedSend,
    TransferReport,
    load_nixl,
    mem_type_of,
)
from kvtier.transfer.registration import TensorMemory

__all__ = ["KVReceiver", "KVSender", "PreparedSend", "TransferReport", "load_nixl"]

_POLL_S = 0.0005
_GRACE_S = 0.5
_SPIN_S = 0.02


class KVReceiver(NixlEndpoint):
    """The decode side: accepts one prefill peer and waits for its blocks."""

    def __init__(self, spec: KVCacheSpec, tensors: Mapping[str, TensorMemory],
                 fingerprint: bytes, *, ipc: bool = True, **kwargs: Any) -> None:
        super().__init__("decode", spec, tensors, fingerprint, **kwargs)
        # GPU memory is offered for CUDA IPC too: a sender on this host maps it and writes
        # the blocks with its own kernel (kvtier.transfer.nixl_ipc); others ignore the offer
        self._ipc_offer = offer(self.plan.regions) if ipc and self.mem_type == "VRAM" else None
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._pending: dict[str, dict[str, Any]] = {}
        self.rejected = 0

    def listen(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Bind the handshake port (loopback by default); return (host, port)."""
        if (host, port) != ("127.0.0.1", 0):
            self._listener.close()
            self._listener = socket.create_server((host, port))
        addr = self._listener.getsockname()
        return str(addr[0]), int(addr[1])

    def accept(self, timeout: float | None = None) -> str:
        """Accept one prefill peer; return its agent name.

        Raises FingerprintMismatch (after answering REJECT) when the peer's namespace differs,
        HandshakeError for malformed frames, TransferTimeout when nobody comes in time.
        """
        self._listener.settimeout(timeout or self.timeout)
        try:
            conn, _ = self._listener.accept()
        except TimeoutError as exc:
            raise TransferTimeout("no prefill peer connected before the timeout") from exc
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            frame = recv_frame(conn, timeout or self.timeout)
            if frame.kind != HELLO:
                raise HandshakeError(f"expected HELLO, got frame kind {frame.kind}")
            if frame.fingerprint != self.fingerprint:
                self.rejected += 1
                send_frame(conn, REJECT, self.fingerprint, {"reason": "namespace fingerprint"})
                raise FingerprintMismatch(
                    f"peer namespace {frame.fingerprint.hex()} != {self.fingerprint.hex()}")
            self._adopt_peer(frame.doc, frame.blob)
            send_frame(conn, ACCEPT, self.fingerprint, self._info_doc(),
                       self.agent.get_agent_metadata())
        except BaseException:
            conn.close()
            raise
        self.sock = conn
        assert self.peer is not None
        return self.peer.agent

    def _info_doc(self) -> dict[str, Any]:
        doc = super()._info_doc()
        if self._ipc_offer is not None:
            doc["ipc"] = self._ipc_offer
        return doc

    def close(self) -> None:
        self._listener.close()
        super().close()

    def _busy(self) -> bool:
        """True while this side has work that a sleep would delay (subclasses)."""
        return False

    def _drain(self) -> None:
        for msgs in self.agent.get_new_notifs().values():
            for msg in msgs:
                self._on_notification(msg)

    def _on_notification(self, msg: bytes) -> None:
        """One message from the peer: a direct transfer's completion (subclasses add kinds)."""
        note = parse_notification(msg)
        if note is not None:
            self._pending[note["req"]] = note

    def wait(self, request_id: str, blocks: Mapping[int, Sequence[int]],
             timeout: float | None = None) -> TransferReport:
        """Block until `request_id`'s KV has landed in `blocks`; then the blocks may be used.

        Raises FingerprintMismatch or TransferError when the notification does not match what
        was expected, PeerGone when the sender died first, TransferTimeout at the deadline.
        """
        start = time.monotonic()
        deadline = start + (timeout or self.timeout)
        want = {int(g): list(ids) for g, ids in blocks.items() if len(ids)}
        gone_at: float | None = None
        while True:
            self._drain()
            note = self._pending.pop(request_id, None)
            if note is not None:
                break
            # a notification may trail the sender's exit: give it a short grace period
            if gone_at is None and not self.peer_alive():
                gone_at = time.monotonic()
            if gone_at is not None and time.monotonic() - gone_at > _GRACE_S:
                raise PeerGone(f"prefill peer left before request {request_id} arrived")
            if time.monotonic() > deadline:
                raise TransferTimeout(f"request {request_id}: no completion before the timeout")
            if not self._busy():
                time.sleep(_POLL_S)
        if note.get("error"):
            raise TransferError(f"request {request_id}: {note['error']}")
        if note["fp"] != self.fingerprint:
            raise FingerprintMismatch(f"request {request_id}: KV of namespace {note['fp'].hex()}")
        if note["blocks"] != want:
            raise TransferError(f"request {request_id}: blocks {note['blocks']} != {want}")
        ndesc = note.get("descriptors")
        if ndesc is None:
            ndesc = len(self.plan.request_descriptors(want))
        return TransferReport(request_id, note["bytes"], ndesc, time.monotonic() - start)


class KVSender(NixlEndpoint):
    """The prefill side: connects to a receiver and writes requests' blocks into it."""

    def __init__(self, spec: KVCacheSpec, tensors: Mapping[str, TensorMemory],
                 fingerprint: bytes, **kwargs: Any) -> None:
        super().__init__("prefill", spec, tensors, fingerprint, **kwargs)

    def connect(self, host: str, port: int, timeout: float | None = None) -> str:
        """Handshake with a receiver; return its agent name. Raises FingerprintMismatch when
        the receiver refuses this namespace, HandshakeError / PeerGone / TransferTimeout."""
        wait = timeout or self.timeout
        try:
            sock = socket.create_connection((host, port), timeout=wait)
        except OSError as exc:
            raise PeerGone(f"cannot reach receiver {host}:{port}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            send_frame(sock, HELLO, self.fingerprint, self._info_doc(),
                       self.agent.get_agent_metadata())
            frame = recv_frame(sock, wait)
            if frame.kind == REJECT:
                raise FingerprintMismatch(f"receiver refused: {frame.doc.get('reason')!r}")
            if frame.kind != ACCEPT:
                raise HandshakeError(f"expected ACCEPT, got frame kind {frame.kind}")
            if frame.fingerprint != self.fingerprint:
                raise FingerprintMismatch("receiver answered with another namespace")
            self._adopt_peer(frame.doc, frame.blob)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        assert self.peer is not None
        return self.peer.agent

    def prepare(self, src_blocks: Mapping[int, Sequence[int]],
                dst_blocks: Mapping[int, Sequence[int]], parts: int = 1) -> PreparedSend:
        """Validate blocks and build NIXL transfer handles once, for `post` to reuse.

        `parts` > 1 splits the descriptors into that many handles posted together (several
        requests in flight; with UCX `num_workers` > 1 they spread over workers). Raises
        ConfigError for bad block ids, TransferError when NIXL refuses the descriptors. The
        handles stay valid until `release`; post one PreparedSend at a time.
        """
        if self.peer is None or self.remote_plan is None:
            raise TransferError("prepare() before connect()")
        if parts < 1:
            raise ConfigError("parts", parts, "an integer >= 1")
        src = {int(g): list(ids) for g, ids in src_blocks.items() if len(ids)}
        dst = {int(g): list(ids) for g, ids in dst_blocks.items() if len(ids)}
        local, remote = self.plan.transfer_descriptors(src, self.remote_plan, dst)
        nbytes = sum(d.nbytes for d in local)
        handles: list[Any] = []
        if local:
            laddr = np.array(self.plan.addresses(local), dtype=np.uint64)
            raddr = np.array(self.remote_plan.addresses(remote), dtype=np.uint64)
            rtype = mem_type_of(self.remote_plan)
            # split by bytes, not by count: equal shares keep the parts finishing together
            cuts = np.searchsorted(np.cumsum(laddr[:, 1]), np.arange(1, parts) * nbytes / parts)
            bounds = sorted({0, len(local), *(min(int(c) + 1, len(local)) for c in cuts)})
            try:
                for a, b in itertools.pairwise(bounds):
                    handles.append(self.agent.initialize_xfer(
                        "WRITE", self.agent.get_xfer_descs(laddr[a:b], self.mem_type),
                        self.agent.get_xfer_descs(raddr[a:b], rtype), self.peer.agent))
            except Exception as exc:
                self.release(PreparedSend(dst, nbytes, len(local), tuple(handles)))
                raise TransferError(f"NIXL refused the transfer: {exc}") from exc
        return PreparedSend(dst, nbytes, len(local), tuple(handles))

    def post(self, prepared: PreparedSend, request_id: str,
             timeout: float | None = None) -> TransferReport:
        """Run a prepared transfer, wait until all its parts are done, then notify the peer.

        The notification goes out only after every part completed, so the receiver never sees
        it before its blocks hold the data. Raises PeerGone / TransferError / TransferTimeout;
        the receiver then never sees a completion for this request.
        """
        if self.peer is None:
            raise TransferError("post() before connect()")
        msg = notification(request_id, self.fingerprint, prepared.dst, prepared.nbytes)
        start = time.monotonic()
        deadline = start + (timeout or self.timeout)
        if len(prepared.handles) == 1:
            # one part: NIXL sends the notification itself right after the data completes
            self._poll(prepared.handles, request_id, deadline, msg)
        else:
            self._poll(prepared.handles, request_id, deadline, b"")
            self.agent.send_notif(self.peer.agent, msg)
        return TransferReport(request_id, prepared.nbytes, prepared.descriptors,
                              time.monotonic() - start)

    def release(self, prepared: PreparedSend) -> None:
        """Free a prepared transfer's handles; safe after a failed post."""
        for h in prepared.handles:
            # an aborted transfer may refuse release; the agent reaps it on close
            with contextlib.suppress(Exception):
                self.agent.release_xfer_handle(h)

    def send(self, request_id: str, src_blocks: Mapping[int, Sequence[int]],
             dst_blocks: Mapping[int, Sequence[int]],
             timeout: float | None = None) -> TransferReport:
        """WRITE src_blocks into the receiver's dst_blocks ({group: ids}) and wait until done.

        Raises ConfigError for bad block ids, PeerGone / TransferError / TransferTimeout when
        the transfer fails; the receiver then never sees a completion for this request. The
        report's seconds include preparing the descriptors.
        """
        start = time.monotonic()
        prepared = self.prepare(src_blocks, dst_blocks)
        try:
            report = self.post(prepared, request_id, timeout)
        finally:
            self.release(prepared)
        return dataclasses.replace(report, seconds=time.monotonic() - start)

    def _poll(self, handles: Sequence[Any], request_id: str, deadline: float,
              msg: bytes) -> None:
        try:
            states = [self.agent.transfer(h, msg) for h in handles]

            def settled() -> bool:
                states[:] = [s if s == "DONE" else self.agent.check_xfer_state(h)
                             for h, s in zip(handles, states)]
                return "PROC" not in states or "ERR" in states

            if "PROC" in states and "ERR" not in states:
                self._wait_until(settled, request_id, deadline, "not done")
        except TransferError:
            raise
        except Exception as exc:  # NIXL raises its own error types for backend failures
            raise TransferError(f"request {request_id}: NIXL transfer failed: {exc}") from exc
        bad = [s for s in states if s != "DONE"]
        if bad:
            raise TransferError(f"request {request_id}: NIXL transfer state {bad[0]}")

    def _wait_until(self, ready: Callable[[], bool], request_id: str, deadline: float,
                    what: str) -> None:
        """Call `ready` until it is true; TransferTimeout (or PeerGone when the receiver left)
        at the deadline. Spins briefly first: a GPU transfer ends within milliseconds and a
        0.5 ms sleep would be a large share of it; then backs off so long waits cost no CPU."""
        spin_until = time.monotonic() + _SPIN_S
        while not ready():
            now = time.monotonic()
            if now > deadline:
                alive = self.peer_alive()
                raise (TransferTimeout if alive else PeerGone)(
                    f"request {request_id}: {what} within the timeout"
                    + ("" if alive else " (receiver gone)"))
            if now > spin_until:
                time.sleep(_POLL_S)
