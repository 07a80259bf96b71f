"""Packed NIXL transfers (gather -> one descriptor per staging slot -> scatter) between two
processes on loopback, and the chunk plan both sides derive."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_nixl_transport import CTX, FP, _expected, make_spec, poisoned_tensors, two_gpus

from kvtier.errors import ConfigError
from kvtier.transfer.handshake import PeerGone, TransferError, TransferTimeout
from kvtier.transfer.pack_plan import chunk_bytes, chunk_plan, planes

try:
    from kvtier.transfer.nixl_packed import PackedReceiver
    from kvtier.transfer.nixl_packed_send import PackedSender
    from kvtier.transfer.nixl_transport import load_nixl

    load_nixl()
except ConfigError:  # pragma: no cover - nixl is a test dependency
    pytest.skip("nixl is not installed", allow_module_level=True)

KINDS = ["plain", "plain_kv_split", "hybrid", "mla"]


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(KINDS), counts=st.lists(st.integers(0, 9), min_size=4, max_size=4),
       slot_rows=st.integers(1, 7), ramp=st.sampled_from([0, 0.3, 1, 2.5]))
def test_chunk_plan_covers_every_row_once(kind: str, counts: list[int], slot_rows: int,
                                          ramp: float) -> None:
    spec = make_spec(kind)
    groups = {g: counts[g] for g in range(len(spec.groups))}
    row = max(p.row_bytes for p in planes(spec, {g: 1 for g in groups}))
    slot = slot_rows * row + 17  # never a whole number of rows: chunks must stop early
    ps, chunks = chunk_plan(spec, groups, slot, int(ramp * row))
    flat = chunk_plan(spec, groups, slot)[1]
    assert len(chunks) >= len(flat)  # a ramp only adds chunks
    seen: dict[int, list[int]] = {}
    for chunk in chunks:
        assert chunk and chunk_bytes(ps, chunk) <= slot
        at = 0
        for piece in chunk:
            assert piece.at == at and piece.lo < piece.hi
            at += (piece.hi - piece.lo) * ps[piece.plane].row_bytes
            seen.setdefault(piece.plane, []).extend(range(piece.lo, piece.hi))
    assert {i: sorted(v) for i, v in seen.items()} == {
        i: list(range(groups[p.group])) for i, p in enumerate(ps)}
    assert all(seen[i] == sorted(seen[i]) for i in seen)  # packed order is block order


def test_a_row_larger_than_a_slot_is_a_config_error() -> None:
    spec = make_spec("plain")
    with pytest.raises(ConfigError, match="slot_bytes"):
        chunk_plan(spec, {0: 2}, spec.block_bytes(0) - 1)


def _receiver(kind: str, requests: list, q: Any, out: Any, slot_bytes: int,
              device: str = "cpu") -> None:
    spec = make_spec(kind)
    tensors = poisoned_tensors(spec, device)
    rx = PackedReceiver(spec, tensors, FP, slot_bytes=slot_bytes, slots=2, timeout=20)
    q.put(rx.listen())
    try:
        rx.accept()
        results = []
        for req, blocks in requests:
            try:
                results.append(("ok", rx.wait(req, blocks, timeout=20).nbytes))
            except TransferError as exc:
                results.append((type(exc).__name__, str(exc)))
        out.put((results, {k: v.cpu().numpy().tobytes() for k, v in tensors.items()}))
    except Exception as exc:
        out.put(([("error", f"{type(exc).__name__}: {exc}")], {}))
    time.sleep(0.5)
    rx.close()


def _start(kind: str, requests: list, slot_bytes: int, device: str = "cpu"):
    q, out = CTX.Queue(), CTX.Queue()
    proc = CTX.Process(target=_receiver, args=(kind, requests, q, out, slot_bytes, device),
                       daemon=True)
    proc.start()
    host, port = q.get(timeout=60)
    return proc, out, host, port


def _sender(kind: str, device: str = "cpu", **kw: Any) -> tuple[PackedSender, dict]:
    spec = make_spec(kind)
    gen = torch.Generator().manual_seed(11)
    tensors = {t.name: torch.randint(0, 256, (t.size_bytes,), dtype=torch.uint8,
                                     generator=gen).to(device) for t in spec.tensors}
    return PackedSender(spec, tensors, FP, **kw), tensors


def _moves(kind: str) -> tuple[dict, dict]:
    spec = make_spec(kind)
    if kind == "hybrid":
        return {0: [0, 1, 2, 3], 2: [5, 9], 3: [12, 13, 14]}, {0: [7, 8, 9, 10], 2: [11, 12],
                                                                3: [2, 3, 21]}
    last = len(spec.groups) - 1
    return {0: [0, 1, 2, 7, 19], last: [9, 10]} if last else {0: [0, 1, 2, 7, 19, 9, 10]}, \
        {0: [20, 21, 3, 4, 16], last: [11, 17]} if last else {0: [20, 21, 3, 4, 16, 11, 17]}


@pytest.mark.parametrize("kind", KINDS)
def test_packed_blocks_arrive_bit_exact_with_slot_reuse(kind: str) -> None:
    spec = make_spec(kind)
    src, dst = _moves(kind)
    slot = 3 * max(spec.block_bytes(g) for g in range(len(spec.groups))) + 100
    second = ({0: [15]}, {0: [23]})
    proc, out, host, port = _start(kind, [("p1", dst), ("d2", second[1])], slot)
    # hybrid and MLA requests go through ramped chunks: the receiver must plan the same cuts
    tx, tensors = _sender(kind, ramp=4 if kind in ("hybrid", "mla") else 0)
    try:
        tx.connect(host, port)
        assert tx.remote_staging is not None and tx.remote_staging.slot_bytes == slot
        rep = tx.send_packed("p1", src, dst)
        assert rep.descriptors > 2  # more chunks than slots: every slot was reused
        tx.send("d2", *second)  # a direct send to the same receiver still works
        results, got = out.get(timeout=60)
    finally:
        tx.close()
        proc.join(timeout=30)
    total = sum(spec.request_block_bytes(g) * len(ids) for g, ids in src.items())
    assert results == [("ok", total), ("ok", spec.request_block_bytes(0))]
    assert rep.nbytes == total
    expected = _expected(spec, tensors, [(src, dst), second])
    for name in got:
        assert got[name] == bytes(expected[name]), f"tensor {name} differs"


def test_send_auto_packs_scattered_blocks_and_sends_long_runs_direct() -> None:
    spec = make_spec("plain")
    slot = 4 * spec.block_bytes(0)
    scattered = ({0: [1, 5, 9, 13]}, {0: [2, 6, 10, 14]})
    run = ({0: [0, 1, 2, 3]}, {0: [20, 21, 22, 23]})
    proc, out, host, port = _start("plain", [("a", scattered[1]), ("b", run[1])], slot)
    tx, tensors = _sender("plain", packed_below=3 * spec.block_bytes(0))
    try:
        tx.connect(host, port)
        packed = tx.send_auto("a", *scattered)  # one block per descriptor: below the bar
        direct = tx.send_auto("b", *run)  # four blocks per descriptor: above it
        results, got = out.get(timeout=60)
    finally:
        tx.close()
        proc.join(timeout=30)
    assert packed.descriptors == 4  # chunks of one slot each (4 tensors of 4 blocks)
    assert direct.descriptors == len(spec.tensors)
    assert [r[0] for r in results] == ["ok", "ok"]
    expected = _expected(spec, tensors, [scattered, run])
    for name in got:
        assert got[name] == bytes(expected[name]), f"tensor {name} differs"


def test_receiver_refuses_out_of_range_blocks_and_a_wrong_slot_size() -> None:
    spec = make_spec("plain")
    slot = 2 * spec.block_bytes(0)
    proc, out, host, port = _start("plain", [("ok1", {0: [1]})], slot)
    tx, _ = _sender("plain")
    try:
        tx.connect(host, port)
        with pytest.raises(ConfigError):  # the sender checks the receiver's block ids too
            tx.send_packed("bad", {0: [1]}, {0: [spec.num_blocks]})
        with pytest.raises(ConfigError):
            tx.send_packed("bad", {0: [1, 2]}, {0: [3]})
        assert tx.remote_staging is not None
        tx.remote_staging = tx.remote_staging._replace(slot_bytes=slot - 1)  # a lying sender
        with pytest.raises(TransferError, match="refused"):
            tx.send_packed("ok1", {0: [1]}, {0: [1]}, timeout=10)
        results, _ = out.get(timeout=60)
    finally:
        tx.close()
        proc.join(timeout=30)
    assert results[0][0] == "TransferError" and "slot size" in results[0][1]


def test_receiver_forgets_abandoned_and_refused_requests() -> None:
    """State of a request whose sender vanished expires after the timeout (no leak, no busy
    polling), and chunks of a refused request are ignored."""
    from kvtier.transfer.nixl_packed import message, parse_message

    spec = make_spec("plain")
    tensors = {t.name: torch.zeros(t.size_bytes, dtype=torch.uint8) for t in spec.tensors}
    rx = PackedReceiver(spec, tensors, FP, slot_bytes=spec.block_bytes(0), slots=2, timeout=5)
    try:
        begin = message("pk", "gone", fp=FP.hex(), ids={"0": [1, 2]},
                        bytes=2 * spec.request_block_bytes(0), slot=spec.block_bytes(0), n=8)
        doc = parse_message(begin)
        assert doc is not None
        rx._begin(doc)
        assert rx._busy() and "gone" in rx._jobs
        rx._jobs["gone"].last -= 10  # no progress for longer than the timeout
        rx._expire()
        assert not rx._busy() and "gone" in rx._dropped
        bad = parse_message(message("pk", "bad", fp=FP.hex(), ids={"0": [1]}, bytes=1,
                                    slot=7, n=1))
        assert bad is not None
        rx._begin(bad)
        assert rx._pending["bad"]["error"].startswith("slot size") and not rx._busy()
        early = parse_message(message("pc", "late", c=0, s=0))
        assert early is not None
        rx._early.setdefault("late", []).append(early)
        rx._early_at["late"] = time.monotonic() - 10
        rx._expire()
        assert not rx._busy()
    finally:
        rx.close()


def _doomed_receiver(q: Any) -> None:
    spec = make_spec("big")
    tensors = {t.name: torch.zeros(t.size_bytes, dtype=torch.uint8) for t in spec.tensors}
    rx = PackedReceiver(spec, tensors, FP, slot_bytes=spec.block_bytes(0), slots=2, timeout=20)
    q.put(rx.listen())
    rx.accept()
    q.put(os.getpid())
    time.sleep(60)  # never drains: the sender runs out of free slots


def test_receiver_that_stops_scattering_or_dies_gives_error_within_timeout() -> None:
    q = CTX.Queue()
    proc = CTX.Process(target=_doomed_receiver, args=(q,), daemon=True)
    proc.start()
    host, port = q.get(timeout=60)
    tx, _ = _sender("big")
    try:
        tx.connect(host, port)
        pid = q.get(timeout=30)
        t0 = time.monotonic()
        with pytest.raises(TransferTimeout):
            tx.send_packed("stuck", {0: list(range(8))}, {0: list(range(8))}, timeout=2)
        assert time.monotonic() - t0 < 10
        os.kill(pid, signal.SIGKILL)
        proc.join(timeout=30)
        t0 = time.monotonic()
        with pytest.raises((PeerGone, TransferError)):
            tx.send_packed("dead", {0: list(range(8))}, {0: list(range(8))}, timeout=3)
        assert time.monotonic() - t0 < 15
    finally:
        tx.close()
        if proc.is_alive():
            proc.kill()


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("kind", ["plain", "hybrid", "mla"])
def test_packed_vram_gpu0_to_gpu1_bit_exact(kind: str) -> None:
    spec = make_spec(kind)
    src, dst = _moves(kind)
    slot = 3 * max(spec.block_bytes(g) for g in range(len(spec.groups))) + 100
    proc, out, host, port = _start(kind, [("g1", dst)], slot, device="cuda:1")
    torch.cuda.set_device(0)
    tx, tensors = _sender(kind, device="cuda:0")
    try:
        tx.connect(host, port)
        tx.send_packed("g1", src, dst)
        results, got = out.get(timeout=120)
    finally:
        tx.close()
        proc.join(timeout=60)
    assert results[0][0] == "ok", results
    expected = _expected(spec, tensors, [(src, dst)])
    for name in got:
        assert got[name] == bytes(expected[name]), f"tensor {name} differs"
