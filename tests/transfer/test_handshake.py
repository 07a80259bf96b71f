"""Handshake frames and peer documents: malformed, oversized or foreign input is refused."""

from __future__ import annotations

import socket
import struct

import pytest

from kvtier.errors import ConfigError
from kvtier.geometry.groups import uniform_spec
from kvtier.transfer.handshake import (
    HEADER,
    HELLO,
    MAX_BLOB,
    HandshakeError,
    PeerGone,
    PeerInfo,
    TransferTimeout,
    check_fingerprint,
    notification,
    parse_notification,
    recv_frame,
    send_frame,
)
from kvtier.transfer.registration import TensorMemory

FP = b"0123456789abcdef"


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair()


def _info() -> PeerInfo:
    spec = uniform_spec(["full"] * 2, 1, 32, 16, 4, "float16")
    return PeerInfo("agent-1", spec, {t.name: TensorMemory(4096 * (i + 1), t.size_bytes)
                                      for i, t in enumerate(spec.tensors)})


def test_round_trip() -> None:
    a, b = _pair()
    with a, b:
        send_frame(a, HELLO, FP, _info().to_doc(), b"\x00meta")
        frame = recv_frame(b, 2.0)
    assert (frame.kind, frame.fingerprint, frame.blob) == (HELLO, FP, b"\x00meta")
    assert PeerInfo.from_doc(frame.doc) == _info()


@pytest.mark.parametrize("header", [
    HEADER.pack(b"HTTP", 1, HELLO, FP, 2, 0),  # not our protocol
    HEADER.pack(b"KVTX", 9, HELLO, FP, 2, 0),  # future version
    HEADER.pack(b"KVTX", 1, 77, FP, 2, 0),  # unknown kind
    HEADER.pack(b"KVTX", 1, HELLO, FP, 2, MAX_BLOB + 1),  # oversized blob
])
def test_bad_headers_refused(header: bytes) -> None:
    a, b = _pair()
    with a, b:
        a.sendall(header + b"{}")
        with pytest.raises(HandshakeError):
            recv_frame(b, 2.0)


@pytest.mark.parametrize("body", [b"\xff\xfe", b"[1, 2]", b"{not json"])
def test_bad_json_refused(body: bytes) -> None:
    a, b = _pair()
    with a, b:
        a.sendall(HEADER.pack(b"KVTX", 1, HELLO, FP, len(body), 0) + body)
        with pytest.raises(HandshakeError):
            recv_frame(b, 2.0)


def test_truncated_frame_and_silence() -> None:
    a, b = _pair()
    with b:
        a.sendall(HEADER.pack(b"KVTX", 1, HELLO, FP, 100, 0) + b"{")
        a.close()
        with pytest.raises(PeerGone):
            recv_frame(b, 2.0)
    a, b = _pair()
    with a, b, pytest.raises(TransferTimeout):
        recv_frame(b, 0.2)


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(agent="bad name with spaces"),
    lambda d: d.update(agent=7),
    lambda d: d.update(spec={"num_blocks": -1}),
    lambda d: d.update(tensors=[1, 2]),
    lambda d: d["tensors"].update(kv0=[1, 2]),
    lambda d: d["tensors"].update(kv0=[True, 1, 0]),
    lambda d: d["tensors"].update(kv0=["1", 1, 0]),
    lambda d: d["tensors"].update(kv0=[0, 1, -1]),
])
def test_bad_peer_documents_refused(mutate) -> None:
    doc = _info().to_doc()
    mutate(doc)
    with pytest.raises(HandshakeError):
        PeerInfo.from_doc(doc)


def test_fingerprint_and_notifications() -> None:
    with pytest.raises(ConfigError):
        check_fingerprint(b"short")
    msg = notification("req-1", FP, {0: [1, 2], 3: [9]}, 1234)
    assert parse_notification(msg) == {"req": "req-1", "fp": FP, "blocks": {0: [1, 2], 3: [9]},
                                       "bytes": 1234}
    assert parse_notification(b"hello") is None
    assert parse_notification(msg.replace(b'"v":1', b'"v":2')) is None
    assert parse_notification(struct.pack("!I", 5)) is None


def test_ucx_defaults_leave_user_settings_alone() -> None:
    from kvtier.transfer.nixl_endpoint import apply_ucx_defaults

    defaults = {"UCX_CUDA_IPC_CACHE_MAX_SIZE": "inf", "UCX_CUDA_IPC_CACHE_MAX_REGIONS": "inf"}
    env = {"UCX_CUDA_IPC_CACHE_MAX_SIZE": "1g", "PATH": "/bin"}
    seen = apply_ucx_defaults(env, defaults)
    assert env["UCX_CUDA_IPC_CACHE_MAX_SIZE"] == "1g"
    assert env["UCX_CUDA_IPC_CACHE_MAX_REGIONS"] == "inf"
    assert "PATH" not in seen and seen["UCX_CUDA_IPC_CACHE_MAX_SIZE"] == "1g"
