"""The prefill/decode handshake: a small framed protocol over one TCP connection.

Each frame is a fixed struct header, a JSON document and an opaque blob (NIXL agent metadata,
parsed by NIXL itself). Nothing from a peer is unpickled or evaluated: sizes are bounded, the
magic and version are checked, the JSON must have the expected shape, and the 16-byte namespace
fingerprint travels in the header so a receiver can refuse a peer *before* it sends the metadata
that would let the peer write into its memory.

    frame  = header | json (utf-8) | blob
    header = magic "KVTX" | version u16 | kind u16 | fingerprint 16s | json_len u32 | blob_len u32
"""

from __future__ import annotations

import json
import re
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

from kvtier.errors import ConfigError, TierError
from kvtier.geometry.groups import KVCacheSpec
from kvtier.transfer.registration import TensorMemory

MAGIC = b"KVTX"
VERSION = 1
HELLO, ACCEPT, REJECT = 1, 2, 3
HEADER = struct.Struct("!4sHH16sII")
MAX_JSON = 1 << 20
MAX_BLOB = 16 << 20
FINGERPRINT_BYTES = 16
_NAME = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class TransferError(TierError):
    """A KV transfer between instances failed; the destination blocks must not be used."""


class TransferTimeout(TransferError):
    """A transfer or handshake did not finish within its timeout."""


class PeerGone(TransferError):
    """The peer closed the connection or died."""


class HandshakeError(TransferError):
    """A peer sent a malformed, oversized or incompatible handshake."""


class FingerprintMismatch(HandshakeError):
    """The peer's namespace fingerprint differs: its KV belongs to another model or tenant."""


def check_fingerprint(fingerprint: bytes) -> bytes:
    if not isinstance(fingerprint, bytes) or len(fingerprint) != FINGERPRINT_BYTES:
        raise ConfigError("fingerprint", fingerprint, f"{FINGERPRINT_BYTES} bytes")
    return fingerprint


@dataclass(frozen=True)
class Frame:
    kind: int
    fingerprint: bytes
    doc: dict[str, Any]
    blob: bytes


def send_frame(sock: socket.socket, kind: int, fingerprint: bytes, doc: dict[str, Any],
               blob: bytes = b"") -> None:
    body = json.dumps(doc, separators=(",", ":")).encode()
    if len(body) > MAX_JSON or len(blob) > MAX_BLOB:
        raise HandshakeError(f"frame too large: json {len(body)} B, blob {len(blob)} B")
    header = HEADER.pack(MAGIC, VERSION, kind, check_fingerprint(fingerprint), len(body), len(blob))
    try:
        sock.sendall(header + body + blob)
    except OSError as exc:
        raise PeerGone(f"sending handshake: {exc}") from exc


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TransferTimeout(f"handshake: {got} of {n} bytes before the timeout")
        sock.settimeout(left)
        try:
            chunk = sock.recv(min(n - got, 1 << 20))
        except TimeoutError as exc:
            raise TransferTimeout(f"handshake: {got} of {n} bytes before the timeout") from exc
        except OSError as exc:
            raise PeerGone(f"receiving handshake: {exc}") from exc
        if not chunk:
            raise PeerGone("peer closed the connection during the handshake")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket, timeout: float) -> Frame:
    """Read and validate one frame; raise HandshakeError, PeerGone or TransferTimeout."""
    deadline = time.monotonic() + timeout
    magic, version, kind, fp, json_len, blob_len = HEADER.unpack(
        _recv_exact(sock, HEADER.size, deadline))
    if magic != MAGIC:
        raise HandshakeError(f"bad magic {magic!r}: the peer does not speak the kvtier protocol")
    if version != VERSION:
        raise HandshakeError(f"protocol version {version}; this side speaks {VERSION}")
    if kind not in (HELLO, ACCEPT, REJECT):
        raise HandshakeError(f"unknown frame kind {kind}")
    if json_len > MAX_JSON or blob_len > MAX_BLOB:
        raise HandshakeError(f"frame too large: json {json_len} B, blob {blob_len} B")
    body = _recv_exact(sock, json_len, deadline)
    blob = _recv_exact(sock, blob_len, deadline) if blob_len else b""
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HandshakeError(f"handshake JSON does not parse: {exc}") from exc
    if not isinstance(doc, dict):
        raise HandshakeError("handshake JSON is not an object")
    return Frame(kind, fp, doc, blob)


@dataclass(frozen=True)
class PeerInfo:
    """What one side tells the other: its agent name, KV layout and tensor addresses."""

    agent: str
    spec: KVCacheSpec
    tensors: dict[str, TensorMemory]

    def to_doc(self) -> dict[str, Any]:
        return {"agent": self.agent, "spec": self.spec.as_dict(),
                "tensors": {k: [m.base, m.nbytes, m.device] for k, m in self.tensors.items()}}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> PeerInfo:
        """Validate a peer's document; raise HandshakeError naming what is wrong."""
        agent = doc.get("agent")
        if not isinstance(agent, str) or not _NAME.match(agent):
            raise HandshakeError(f"bad agent name {agent!r}")
        try:
            spec = KVCacheSpec.from_dict(doc["spec"])
        except (ConfigError, KeyError, TypeError) as exc:
            raise HandshakeError(f"bad KV cache spec from {agent}: {exc}") from exc
        raw = doc.get("tensors")
        if not isinstance(raw, dict):
            raise HandshakeError(f"bad tensor table from {agent}")
        tensors: dict[str, TensorMemory] = {}
        for name, value in raw.items():
            ok = (isinstance(value, list) and len(value) == 3
                  and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
                  and value[0] > 0 and value[1] > 0 and value[2] >= -1)
            if not ok:
                raise HandshakeError(f"bad tensor entry {name!r}: {value!r}")
            tensors[str(name)] = TensorMemory(*value)
        return cls(agent, spec, tensors)


def notification(request_id: str, fingerprint: bytes, blocks: dict[int, list[int]],
                 nbytes: int, descriptors: int | None = None) -> bytes:
    """The completion message a sender attaches to a transfer. `descriptors`: how many the
    sender used, for a path whose count the receiver cannot derive from its block runs (an
    IPC copy uses none); without it the receiver counts its own runs."""
    doc = {"v": VERSION, "req": request_id, "fp": fingerprint.hex(),
           "blocks": {str(g): ids for g, ids in blocks.items()}, "bytes": nbytes}
    if descriptors is not None:
        doc["descriptors"] = descriptors
    return json.dumps(doc, separators=(",", ":")).encode()


def parse_notification(msg: bytes) -> dict[str, Any] | None:
    """A validated notification, or None for anything that is not one of ours."""
    if len(msg) > MAX_JSON:
        return None
    try:
        doc = json.loads(msg.decode("utf-8"))
        blocks = {int(g): [int(b) for b in ids] for g, ids in doc["blocks"].items()}
        if doc["v"] != VERSION or not isinstance(doc["req"], str):
            return None
        note = {"req": doc["req"], "fp": bytes.fromhex(doc["fp"]), "blocks": blocks,
                "bytes": int(doc["bytes"])}
        if "descriptors" in doc:
            note["descriptors"] = int(doc["descriptors"])
        return note
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return None
