"""The CUDA IPC path of P/D transfers: the receiver offers its KV memory, the sender maps it and
writes the rows with its own kernel, then notifies over NIXL. The offer's validation and the
fallback to NIXL run everywhere; the copies themselves need CUDA (one GPU: two processes on it;
two GPUs: GPU0 -> GPU1)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest
import torch
from test_nixl_transport import CTX, FP, _expected, make_spec, poisoned_tensors, serve

from kvtier.errors import ConfigError
from kvtier.transfer.cuda_ipc import host_id, offer, parse_offer
from kvtier.transfer.handshake import HandshakeError, PeerGone, TransferError
from kvtier.transfer.registration import Region

try:
    from kvtier.transfer.nixl_ipc import IpcSender
    from kvtier.transfer.nixl_packed import PackedReceiver
    from kvtier.transfer.nixl_transport import load_nixl

    load_nixl()
except ConfigError:  # pragma: no cover - nixl is a test dependency
    pytest.skip("nixl is not installed", allow_module_level=True)

one_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
REGIONS = [Region(1 << 20, 4096, 0), Region(1 << 24, 8192, 0)]


def _offer_doc() -> dict[str, Any]:
    return {"host": host_id(), "gpu": "GPU-x",
            "regions": [["ab" * 64, 0, 4096], ["cd" * 64, 256, 8192]]}


def test_a_valid_offer_parses_and_host_memory_offers_nothing() -> None:
    parsed = parse_offer(_offer_doc(), REGIONS)
    assert parsed is not None and [e.offset for e in parsed.exports] == [0, 256]
    assert (parsed.host, parsed.gpu) == (host_id(), "GPU-x")
    assert parse_offer(None, REGIONS) is None
    assert offer([Region(1 << 20, 4096)]) is None  # DRAM
    assert offer([Region(1 << 20, 4096, 0), Region(1 << 24, 4096, 1)]) is None  # two GPUs


@pytest.mark.parametrize("bad", [
    {"regions": [["ab" * 64, 0, 4096], ["cd" * 64, 256, 8192]]},  # no host, no GPU
    {**_offer_doc(), "regions": [["ab" * 64, 0, 4096]]},  # a region missing
    {**_offer_doc(), "regions": [["ab" * 63, 0, 4096], ["cd" * 64, 256, 8192]]},  # short handle
    {**_offer_doc(), "regions": [["AB" * 64, 0, 4096], ["cd" * 64, 256, 8192]]},  # not lower hex
    {**_offer_doc(), "regions": [["ab" * 64, -1, 4096], ["cd" * 64, 256, 8192]]},
    {**_offer_doc(), "regions": [["ab" * 64, 0, 4095], ["cd" * 64, 256, 8192]]},  # wrong extent
    {**_offer_doc(), "regions": [["ab" * 64, True, 4096], ["cd" * 64, 256, 8192]]},
    "not a dict",
])
def test_a_malformed_offer_is_a_handshake_error(bad: Any) -> None:
    with pytest.raises(HandshakeError, match="IPC offer"):
        parse_offer(bad, REGIONS)


class _LyingReceiver(PackedReceiver):
    def _info_doc(self) -> dict[str, Any]:
        return {**super()._info_doc(), "ipc": {"host": "x", "gpu": "y", "regions": [[1, 2]]}}


def _receiver(kind: str, requests: list, q: Any, out: Any, device: str, ipc: bool,
              linger: float = 0.5, lying: bool = False) -> None:
    spec = make_spec(kind)
    tensors = poisoned_tensors(spec, device)
    cls = _LyingReceiver if lying else PackedReceiver
    rx = cls(spec, tensors, FP, slot_bytes=4 * spec.block_bytes(0), slots=2, timeout=20, ipc=ipc)
    serve(rx, tensors, requests, q, out, linger)


def _start(kind: str, requests: list, device: str = "cpu", ipc: bool = True, **kw: Any):
    q, out = CTX.Queue(), CTX.Queue()
    proc = CTX.Process(target=_receiver, args=(kind, requests, q, out, device, ipc),
                       kwargs=kw, daemon=True)
    proc.start()
    host, port = q.get(timeout=60)
    return proc, q, out, host, port


def _sender(kind: str, device: str = "cpu", **kw: Any) -> tuple[IpcSender, dict]:
    spec = make_spec(kind)
    if device != "cpu":
        torch.cuda.set_device(device)
    gen = torch.Generator().manual_seed(5)
    tensors = {t.name: torch.randint(0, 256, (t.size_bytes,), dtype=torch.uint8,
                                     generator=gen).to(device) for t in spec.tensors}
    return IpcSender(spec, tensors, FP, timeout=20, **kw), tensors


def _receiver_gpu() -> str:
    """GPU1 where there is one, else the sender's GPU (two processes on one GPU)."""
    return "cuda:1" if torch.cuda.device_count() > 1 else "cuda:0"


def _moves(spec: Any) -> tuple[dict, dict]:
    last = len(spec.groups) - 1
    if last:
        return {0: [0, 1, 2, 7], last: [9, 10]}, {0: [20, 21, 3, 4], last: [11, 17]}
    return {0: [0, 1, 2, 7, 9, 10]}, {0: [20, 21, 3, 4, 11, 17]}


def test_without_cuda_or_an_offer_send_auto_goes_over_nixl() -> None:
    spec = make_spec("plain")
    src, dst = _moves(spec)
    proc, _, out, host, port = _start("plain", [("r", dst)])
    tx, tensors = _sender("plain")
    try:
        tx.connect(host, port)
        assert tx.peer_rows is None and tx.ipc_unused
        with pytest.raises(TransferError, match="no IPC path"):
            tx.send_ipc("x", src, dst)
        rep = tx.send_auto("r", src, dst)
        status, _, got = out.get(timeout=60)
    finally:
        tx.close()
        proc.join(timeout=30)
    assert status == "ok" and rep.descriptors > 0  # NIXL descriptors: not the IPC path
    expected = _expected(spec, tensors, [(src, dst)])
    assert all(got[n] == bytes(expected[n]) for n in got)


def test_a_malformed_offer_fails_the_handshake() -> None:
    proc, *_, host, port = _start("plain", [], lying=True)
    tx, _ = _sender("plain")
    try:
        with pytest.raises(HandshakeError, match="IPC offer"):
            tx.connect(host, port)
        assert tx.peer is None
    finally:
        tx.close()
        proc.kill()
        proc.join(timeout=30)


def _ipc_round(kind: str, rx_device: str, tx_device: str) -> None:
    spec = make_spec(kind)
    src, dst = _moves(spec)
    again = ({0: [5]}, {0: [6]})
    proc, _, out, host, port = _start(kind, [("i1", dst), ("i2", again[1])], rx_device)
    tx, tensors = _sender(kind, tx_device)
    try:
        tx.connect(host, port)
        assert tx.peer_rows is not None, tx.ipc_unused
        with pytest.raises(ConfigError):  # the receiver's ids are checked before any copy
            tx.send_ipc("bad", src, {g: [spec.num_blocks] * len(v) for g, v in src.items()})
        rep = tx.send_auto("i1", src, dst)  # send_auto prefers the mapped memory
        tx.send_ipc("i2", *again)
        status, reports, got = out.get(timeout=120)
    finally:
        tx.close()
        proc.join(timeout=60)
    assert status == "ok", (reports, got)
    total = sum(spec.request_block_bytes(g) * len(v) for g, v in src.items())
    assert rep.descriptors == 0 and reports == [(total, 0), (spec.request_block_bytes(0), 0)]
    expected = _expected(spec, tensors, [(src, dst), again])
    for name in got:
        assert got[name] == bytes(expected[name]), f"tensor {name} differs"


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("kind", ["plain", "plain_kv_split", "hybrid", "mla"])
def test_ipc_gpu0_to_gpu1_bit_exact(kind: str) -> None:
    _ipc_round(kind, "cuda:1", "cuda:0")


@pytest.mark.gpu
@one_gpu
def test_ipc_between_two_processes_on_one_gpu_bit_exact() -> None:
    _ipc_round("hybrid", "cuda:0", "cuda:0")


@pytest.mark.gpu
@one_gpu
def test_repeated_request_shapes_replay_a_graph_bit_exact() -> None:
    """The second request of a shape captures a CUDA graph and later ones replay it, each
    with its own block ids; a directly launched sender of the same requests is the control."""
    spec = make_spec("hybrid")
    src, dst = _moves(spec)
    moves = [({g: [(b + 3 * k) % spec.num_blocks for b in v] for g, v in src.items()},
              {g: [(b + 5 * k) % spec.num_blocks for b in v] for g, v in dst.items()})
             for k in range(4)]
    for graphs in (True, False):
        proc, _, out, host, port = _start("hybrid", [(f"g{k}", d) for k, (_, d) in
                                                     enumerate(moves)], _receiver_gpu())
        tx, tensors = _sender("hybrid", "cuda:0", ipc_graphs=graphs)
        try:
            tx.connect(host, port)
            assert tx.peer_rows is not None, tx.ipc_unused
            for k, (s, d) in enumerate(moves):
                tx.send_ipc(f"g{k}", s, d)
            status, reports, got = out.get(timeout=120)
            captured, err = tx.peer_rows.graphs_captured, tx.peer_rows.graph_error
        finally:
            tx.close()
            proc.join(timeout=60)
        assert status == "ok", (reports, got)
        assert captured == (1 if graphs else 0), err
        expected = _expected(spec, tensors, moves)
        for name in got:
            assert got[name] == bytes(expected[name]), f"graphs={graphs}: {name} differs"


@pytest.mark.gpu
@one_gpu
def test_receiver_that_offers_nothing_gets_nixl_on_a_gpu() -> None:
    spec = make_spec("plain")
    src, dst = _moves(spec)
    proc, _, out, host, port = _start("plain", [("n", dst)], _receiver_gpu(), ipc=False)
    tx, tensors = _sender("plain", "cuda:0")
    try:
        tx.connect(host, port)
        assert tx.peer_rows is None and "no IPC" in tx.ipc_unused
        rep = tx.send_auto("n", src, dst)
        status, _, got = out.get(timeout=120)
    finally:
        tx.close()
        proc.join(timeout=60)
    assert status == "ok" and rep.descriptors > 0
    expected = _expected(spec, tensors, [(src, dst)])
    assert all(got[n] == bytes(expected[n]) for n in got)


@pytest.mark.gpu
@one_gpu
def test_a_dead_receiver_gives_peer_gone_not_a_hang() -> None:
    spec = make_spec("plain")
    src, dst = _moves(spec)
    proc, q, _, host, port = _start("plain", [("never", dst)], _receiver_gpu(), linger=60)
    tx, _ = _sender("plain", "cuda:0")
    try:
        tx.connect(host, port)
        assert q.get(timeout=30) == "accepted" and tx.peer_rows is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
        t0 = time.monotonic()
        with pytest.raises(PeerGone):
            tx.send_ipc("late", src, dst)
        assert time.monotonic() - t0 < tx.timeout
    finally:
        tx.close()
