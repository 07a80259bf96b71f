"""Prefill -> decode KV transfer over NIXL between two processes on loopback."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from typing import Any

import pytest
import torch

from kvtier.errors import ConfigError
from kvtier.geometry.groups import KVCacheSpec, uniform_spec
from kvtier.transfer.handshake import FingerprintMismatch, PeerGone, TransferError
from kvtier.transfer.registration import TensorMemory, block_runs, paired_runs

try:
    from kvtier.transfer.nixl_transport import KVReceiver, KVSender, load_nixl

    load_nixl()
except ConfigError:  # pragma: no cover - nixl is a test dependency
    pytest.skip("nixl is not installed", allow_module_level=True)

FP = bytes(range(16))
POISON = 0xAB
CTX = mp.get_context("spawn")


def make_spec(kind: str, num_blocks: int = 24) -> KVCacheSpec:
    if kind == "plain":
        return uniform_spec(["full"] * 4, 2, 32, 16, num_blocks, "float16")
    if kind == "plain_kv_split":
        return uniform_spec(["full"] * 3, 2, 32, 16, num_blocks, "float16", kv_split=True)
    if kind == "hybrid":  # 14 layers (10 sliding in 3 groups, 4 full in 1) share 4 tensors
        kinds = ["sliding", "sliding", "full"] * 4 + ["sliding", "sliding"]
        return uniform_spec(kinds, 2, 32, 16, num_blocks, "float16", sliding_window=64)
    if kind == "mla":
        return uniform_spec(["mla"] * 3, 1, 96, 16, num_blocks, "bfloat16")
    if kind == "big":
        return uniform_spec(["full"] * 2, 8, 128, 16, 256, "bfloat16")
    raise ValueError(kind)


def poisoned_tensors(spec: KVCacheSpec, device: str) -> dict[str, torch.Tensor]:
    """A receiver's KV tensors on `device` (made the current one), POISON in every byte."""
    if device != "cpu":
        torch.cuda.set_device(device)
    return {t.name: torch.full((t.size_bytes,), POISON, dtype=torch.uint8, device=device)
            for t in spec.tensors}


def serve(rx: Any, tensors: dict[str, torch.Tensor], requests: list, q: Any, out: Any,
          linger: float) -> None:
    """Accept one sender (q gets the address, then "accepted"), wait for `requests` in order,
    then put ("ok", [(nbytes, descriptors)], final bytes per tensor) or ("error", exception
    type, message) on `out`; close after `linger` seconds."""
    q.put(rx.listen())
    try:
        rx.accept()
        q.put("accepted")
        reports = [rx.wait(req, blocks, timeout=20) for req, blocks in requests]
        out.put(("ok", [(r.nbytes, r.descriptors) for r in reports],
                 {k: v.cpu().numpy().tobytes() for k, v in tensors.items()}))
    except Exception as exc:
        out.put(("error", type(exc).__name__, str(exc)))
    time.sleep(linger)
    rx.close()


def _receiver(kind: str, fp: bytes, requests: list, q: Any, out: Any, linger: float,
              device: str = "cpu") -> None:
    spec = make_spec(kind)
    tensors = poisoned_tensors(spec, device)
    rx = KVReceiver(spec, {k: TensorMemory.of(v) for k, v in tensors.items()}, fp, timeout=20)
    serve(rx, tensors, requests, q, out, linger)


def _start_receiver(kind: str, fp: bytes, requests: list, linger: float = 0.0,
                    device: str = "cpu"):
    q, out = CTX.Queue(), CTX.Queue()
    proc = CTX.Process(target=_receiver, args=(kind, fp, requests, q, out, linger, device),
                       daemon=True)
    proc.start()
    host, port = q.get(timeout=60)
    return proc, q, out, host, port


def _sender(kind: str, seed: int = 0,
            device: str = "cpu") -> tuple[KVSender, dict[str, torch.Tensor]]:
    spec = make_spec(kind)
    gen = torch.Generator().manual_seed(seed)
    tensors = {t.name: torch.randint(0, 256, (t.size_bytes,), dtype=torch.uint8,
                                     generator=gen).to(device)
               for t in spec.tensors}
    return KVSender(spec, {k: TensorMemory.of(v) for k, v in tensors.items()}, FP), tensors


def _expected(spec: KVCacheSpec, src: dict[str, torch.Tensor],
              moves: list[tuple[dict, dict]]) -> dict[str, bytearray]:
    """Reference result: poison everywhere, each moved block copied layer-tensor by tensor."""
    out = {t.name: bytearray([POISON]) * t.size_bytes for t in spec.tensors}
    for src_blocks, dst_blocks in moves:
        for g, ids in src_blocks.items():
            bb = spec.block_bytes(g)
            for t in spec.tensors_of_group(g):
                s = src[t.name].cpu().numpy().tobytes()
                for a, b in zip(ids, dst_blocks[g]):
                    if t.kv_split:
                        h, v = bb // 2, spec.num_blocks * (bb // 2)
                        out[t.name][b * h:(b + 1) * h] = s[a * h:(a + 1) * h]
                        out[t.name][v + b * h:v + (b + 1) * h] = s[v + a * h:v + (a + 1) * h]
                    else:
                        out[t.name][b * bb:(b + 1) * bb] = s[a * bb:(a + 1) * bb]
    return out


@pytest.mark.parametrize("kind", ["plain", "plain_kv_split", "hybrid", "mla"])
def test_blocks_arrive_bit_exact_and_nowhere_else(kind: str) -> None:
    spec = make_spec(kind)
    groups = range(len(spec.groups))
    # block ids come from one pool: give each group its own, partly contiguous, partly not
    src = {g: [3 * g, 3 * g + 1, 20 - g] for g in groups}
    dst = {g: [23 - 3 * g, 22 - 3 * g, 2 * g] if g < 3 else [10 + g, 11 + g, 18 + g]
           for g in groups}
    if kind == "hybrid":
        assert len(spec.groups) == 4 and len(spec.tensors) == 4
        # sliding group 0 (4 layers), the 2-layer sliding group 2 and the full group 3
        src = {0: [0, 1, 2, 3], 2: [5, 9], 3: [12, 13, 14]}
        dst = {0: [7, 8, 9, 10], 2: [11, 12], 3: [2, 3, 21]}
    second_src, second_dst = {0: [15]}, {0: [23]}
    proc, _, out, host, port = _start_receiver(kind, FP, [("r1", dst), ("r2", second_dst)])
    tx, tensors = _sender(kind)
    try:
        assert tx.connect(host, port) == tx.peer.agent  # type: ignore[union-attr]
        assert tx.registered_regions == len(spec.tensors)
        rep = tx.send("r1", src, dst)
        tx.send("r2", second_src, second_dst)
        status, reports, got = out.get(timeout=60)
    finally:
        tx.close()
        proc.join(timeout=30)
    assert status == "ok", reports
    split = 2 if spec.tensors[0].kv_split else 1
    # the sender splits runs where either side breaks; the receiver counts its own runs
    sent = sum(len(spec.tensors_of_group(g)) * len(paired_runs(ids, dst[g])) * split
               for g, ids in src.items())
    landed = sum(len(spec.tensors_of_group(g)) * len(block_runs(ids)) * split
                 for g, ids in dst.items())
    assert rep.descriptors == sent
    assert reports[0] == (sum(spec.request_block_bytes(g) * len(ids) for g, ids in src.items()),
                          landed)
    expected = _expected(spec, tensors, [(src, dst), (second_src, second_dst)])
    for name in got:
        assert got[name] == bytes(expected[name]), f"tensor {name} differs"


def test_wrong_fingerprint_is_rejected() -> None:
    other = bytes(16)
    proc, _, out, host, port = _start_receiver("plain", other, [("r1", {0: [1]})])
    tx, _ = _sender("plain")
    try:
        with pytest.raises(FingerprintMismatch):
            tx.connect(host, port)
        status, name, _ = out.get(timeout=60)
    finally:
        tx.close()
        proc.join(timeout=30)
    assert (status, name) == ("error", "FingerprintMismatch")


def test_receiver_killed_mid_transfer_gives_error_within_timeout() -> None:
    proc, q, _, host, port = _start_receiver("big", FP, [("never", {0: [0]})], linger=60)
    tx, _ = _sender("big")
    tx.timeout = 3.0
    blocks = {0: list(range(256))}
    try:
        tx.connect(host, port)
        assert q.get(timeout=30) == "accepted"
        tx.send("warm", blocks, blocks)
        # kill from another thread while sends are in flight on this one
        killer = threading.Timer(0.05, os.kill, (proc.pid, signal.SIGKILL))
        killer.start()
        killed_at = time.monotonic() + 0.05
        err: Exception | None = None
        for i in range(1000):
            t0 = time.monotonic()
            try:
                tx.send(f"after-{i}", blocks, blocks)
            except TransferError as exc:
                err = exc
            assert time.monotonic() - t0 < tx.timeout + 2.0, "a send outlived its timeout"
            if err is not None:
                break
        assert err is not None, "sending into a dead peer kept succeeding"
        assert time.monotonic() - killed_at < 2 * (tx.timeout + 2.0)
    finally:
        tx.close()
        proc.join(timeout=30)


def _dying_sender(host: str, port: int) -> None:
    tx, _ = _sender("plain")
    tx.connect(host, port)
    time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)


def test_sender_killed_receiver_errors_not_hangs() -> None:
    spec = make_spec("plain")
    tensors = {t.name: torch.zeros(t.size_bytes, dtype=torch.uint8) for t in spec.tensors}
    with KVReceiver(spec, {k: TensorMemory.of(v) for k, v in tensors.items()}, FP) as rx:
        host, port = rx.listen()
        proc = CTX.Process(target=_dying_sender, args=(host, port), daemon=True)
        proc.start()
        rx.accept(timeout=60)
        t0 = time.monotonic()
        with pytest.raises(PeerGone):
            rx.wait("r1", {0: [1, 2]}, timeout=10)
        assert time.monotonic() - t0 < 10
        proc.join(timeout=30)


def test_bad_blocks_raise_config_error_before_any_transfer() -> None:
    proc, _, out, host, port = _start_receiver("plain", FP, [("r1", {0: [1]})])
    tx, _ = _sender("plain")
    try:
        tx.connect(host, port)
        with pytest.raises(ConfigError):
            tx.send("bad", {0: [1]}, {0: [999]})
        with pytest.raises(ConfigError):
            tx.send("bad", {0: [1, 2]}, {0: [1]})
        tx.send("r1", {0: [4]}, {0: [1]})
        assert out.get(timeout=60)[0] == "ok"
    finally:
        tx.close()
        proc.join(timeout=30)


two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("kind", ["plain", "hybrid", "mla"])
def test_vram_gpu0_to_gpu1_bit_exact(kind: str) -> None:
    spec = make_spec(kind)
    src = {0: [0, 1, 2, 7], len(spec.groups) - 1: [9, 10]}
    dst = {0: [20, 21, 3, 4], len(spec.groups) - 1: [11, 17]}
    proc, _, out, host, port = _start_receiver(kind, FP, [("g1", dst)], device="cuda:1")
    torch.cuda.set_device(0)
    tx, tensors = _sender(kind, device="cuda:0")
    try:
        assert tx.mem_type == "VRAM"
        tx.connect(host, port)
        tx.send("g1", src, dst)
        status, reports, got = out.get(timeout=120)
    finally:
        tx.close()
        proc.join(timeout=60)
    assert status == "ok", reports
    expected = _expected(spec, tensors, [(src, dst)])
    for name in got:
        assert got[name] == bytes(expected[name]), f"tensor {name} differs"


def test_prepared_parts_reposted_bit_exact() -> None:
    """One prepared send split into 3 parts (UCX with 2 workers), posted twice."""
    spec = make_spec("plain")
    src = {0: [0, 1, 2, 3, 9, 10, 17]}
    dst = {0: [5, 6, 7, 8, 1, 2, 20]}
    proc, _, out, host, port = _start_receiver("plain", FP, [("p1", dst), ("p2", dst)])
    gen = torch.Generator().manual_seed(3)
    tensors = {t.name: torch.randint(0, 256, (t.size_bytes,), dtype=torch.uint8, generator=gen)
               for t in spec.tensors}
    tx = KVSender(spec, {k: TensorMemory.of(v) for k, v in tensors.items()}, FP,
                  backend_params={"UCX": {"num_workers": "2"}})
    try:
        tx.connect(host, port)
        prepared = tx.prepare(src, dst, parts=3)
        assert len(prepared.handles) == 3
        assert prepared.descriptors == len(spec.tensors) * len(paired_runs(src[0], dst[0]))
        first = tx.post(prepared, "p1")
        second = tx.post(prepared, "p2")
        with pytest.raises(ConfigError):
            tx.prepare(src, dst, parts=0)
        tx.release(prepared)
        status, reports, got = out.get(timeout=60)
    finally:
        tx.close()
        proc.join(timeout=30)
    assert status == "ok", reports
    assert first.nbytes == second.nbytes == spec.request_block_bytes(0) * len(src[0])
    expected = _expected(spec, tensors, [(src, dst)])
    for name in got:
        assert got[name] == bytes(expected[name]), f"tensor {name} differs"
