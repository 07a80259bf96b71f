"""`kvtier bench pd`: a request's KV moved prefill -> decode through NIXL, against memcpy.

Two processes: a decode receiver (a spawned child) and the prefill sender (this process), each
holding a KV cache laid out as the geometry's layers over separate tensors. Each case sends one
request's blocks `--repeat` times and reports the best bandwidth next to the ceiling measured in
the same run: a local memcpy of the same bytes on CPU, a GPU0 -> GPU1 peer copy on GPUs. Block
tables: `contiguous` (one descriptor per tensor), `runs` (runs of about 16 blocks in random
order, as a free list hands them out) and `scattered` (random single blocks, the worst case).
Modes: `request` (send(): descriptors prepared and released per request), `transfer`
(handles prepared once and posted per request, optionally split into parts in flight),
`packed` (staging slots) and, on GPUs, `ipc` (the receiver's memory mapped through CUDA IPC,
one copy kernel). Before each row
the receiver poisons its destination blocks; after it, it hashes them and the sender compares
with its source blocks: a wrong byte fails the run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kvtier.cli import provenance
from kvtier.geometry.groups import KVCacheSpec, uniform_spec
from kvtier.geometry.spec import preset

FP = hashlib.blake2b(b"kvtier bench pd", digest_size=16).digest()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="cuda: GPU0 -> GPU1 (needs 2 GPUs); auto picks cuda when it can")
    parser.add_argument("--geometry", default="llama3-8b", help="geometry preset")
    parser.add_argument("--tokens", type=int, default=0,
                        help="request length (default 1024 on CPU, 8192 on GPU)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--parts", default="1,4",
                        help="comma-separated: prepared transfers split into this many requests")
    parser.add_argument("--workers", type=int, default=1, help="UCX workers per agent")
    parser.add_argument("--slot-mib", type=int, default=128,
                        help="packed mode: staging slot size (4 slots per side)")
    parser.add_argument("--pack-programs", type=float, default=0.0,
                        help="packed mode: gather/scatter programs per SM (0: kvtier's default)")
    parser.add_argument("--ipc-programs", type=float, default=0.0,
                        help="ipc mode: copy programs per SM (0: kvtier's default)")
    parser.add_argument("--ipc-spread", action="store_true",
                        help="ipc mode: tiles plane by plane through a row")
    parser.add_argument("--ipc-direct", action="store_true",
                        help="ipc mode: launch every request's kernels, never a captured graph")
    parser.add_argument("--modes", default="ipc,request,transfer,packed,packed-ramp",
                        help="comma-separated modes to measure")
    parser.add_argument("--save", metavar="DIR", help="write pd-<device>-<date>.json/.md here")


def bench_spec(geometry: str, tokens: int) -> tuple[KVCacheSpec, int]:
    g = preset(geometry)
    blocks = -(-tokens // g.page_size)
    kind = "mla" if g.mla else "full"
    spec = uniform_spec([kind] * g.num_layers, g.num_kv_heads, g.head_size, g.page_size,
                        2 * blocks, g.dtype)
    return spec, blocks


def _run_table(rng: Any, n: int, total: int, mean: int) -> list[int]:
    """`n` block ids out of `total` in runs of 1..2*mean blocks, the runs in random order:
    what an engine's free list hands out after some churn."""
    runs, start = [], 0
    while start < total:
        length = min(rng.randint(1, 2 * mean - 1), total - start)
        runs.append(list(range(start, start + length)))
        start += length
    rng.shuffle(runs)
    return [b for r in runs for b in r][:n]


def _cases(blocks: int, seed: int = 7) -> dict[str, tuple[list[int], list[int]]]:
    """contiguous: one run; runs: runs of mean 16 blocks, both sides apart; scattered: random
    single blocks (the worst case)."""
    import random

    rng = random.Random(seed)
    pool = list(range(2 * blocks))
    rng.shuffle(pool)
    return {"contiguous": (list(range(blocks)), list(range(blocks, 2 * blocks))),
            "runs": (_run_table(rng, blocks, 2 * blocks, 16),
                     _run_table(rng, blocks, 2 * blocks, 16)),
            "scattered": (pool[:blocks], pool[blocks:])}


def _digest(spec: KVCacheSpec, tensors: dict[str, Any], ids: list[int]) -> str:
    import torch

    h = hashlib.blake2b(digest_size=16)
    bb = spec.block_bytes(0)
    idx = torch.tensor(ids, dtype=torch.long)
    for t in spec.tensors:
        rows = tensors[t.name].view(-1, bb).index_select(0, idx.to(tensors[t.name].device))
        h.update(rows.cpu().numpy().tobytes())
    return h.hexdigest()


def _alloc(spec: KVCacheSpec, device: str, fill: int | None) -> dict[str, Any]:
    import torch

    out = {}
    for i, t in enumerate(spec.tensors):
        if fill is None:
            gen = torch.Generator(device=device).manual_seed(i)
            out[t.name] = torch.randint(0, 256, (t.size_bytes,), dtype=torch.uint8,
                                        device=device, generator=gen)
        else:
            out[t.name] = torch.full((t.size_bytes,), fill, dtype=torch.uint8, device=device)
    return out


def _receiver(geometry: str, tokens: int, device: str, workers: int, slot_mib: int,
              programs: float, q: Any, out: Any) -> None:
    """Per task ("case", name, request ids, dst blocks): poison dst, say ready, wait for all
    ids, answer the digest of dst. ("done",) ends."""
    import torch

    from kvtier.transfer.nixl_packed import PackedReceiver

    spec, _ = bench_spec(geometry, tokens)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)  # UCX registers VRAM in the current device's context
    tensors = _alloc(spec, device, 0xAB)
    bb = spec.block_bytes(0)
    with PackedReceiver(spec, tensors, FP, slot_bytes=slot_mib << 20, slots=4,
                        programs_per_sm=programs or None, timeout=120,
                        backend_params=_params(workers)) as rx:
        q.put(rx.listen())
        try:
            rx.accept()
            while True:
                task = q.get(timeout=600)
                if task[0] != "case":
                    break
                _, name, ids, dst = task
                idx = torch.tensor(dst, dtype=torch.long, device=device)
                for t in tensors.values():  # a stale copy from an earlier case must not pass
                    t.view(-1, bb).index_fill_(0, idx, 0xAB)
                if device.startswith("cuda"):
                    torch.cuda.synchronize(device)
                out.put(("ready",))
                for rid in ids:
                    rx.wait(rid, {0: dst})
                if device.startswith("cuda"):
                    torch.cuda.synchronize(device)
                out.put(("case", name, _digest(spec, tensors, dst)))
        except Exception as exc:
            out.put(("error", type(exc).__name__, str(exc)))


def _params(workers: int) -> dict[str, dict[str, str]] | None:
    return {"UCX": {"num_workers": str(workers)}} if workers > 1 else None


def _ceiling(nbytes: int, device: str, repeat: int) -> float:
    """Best GB/s of one copy of nbytes: local memcpy on CPU, GPU0 -> GPU1 on GPUs."""
    import torch

    if device == "cpu":
        src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
        dst, sync = torch.zeros_like(src), (lambda: None)
    else:
        src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda:0")
        dst = torch.zeros(nbytes, dtype=torch.uint8, device="cuda:1")

        def sync() -> None:
            torch.cuda.synchronize("cuda:0")
            torch.cuda.synchronize("cuda:1")
    best = float("inf")
    for _ in range(max(repeat, 10)):
        sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - t0)
    if not torch.equal(dst.cpu(), src.cpu()):
        raise RuntimeError("ceiling copy produced wrong bytes")
    return nbytes / best / 1e9


def _copies_ceiling(spec: KVCacheSpec, src: list[int], dst: list[int], repeat: int) -> float:
    """Best GB/s of the same descriptors as copies GPU0 -> GPU1 in this process: one
    cudaMemcpyAsync per descriptor on one stream, as UCX cuda_ipc issues them."""
    import torch

    from kvtier.transfer.registration import RegistrationPlan, TensorMemory

    a = _alloc(spec, "cuda:0", None)
    b = _alloc(spec, "cuda:1", 0)
    pa = RegistrationPlan(spec, {k: TensorMemory.of(v) for k, v in a.items()})
    pb = RegistrationPlan(spec, {k: TensorMemory.of(v) for k, v in b.items()})
    local, remote = pa.transfer_descriptors({0: src}, pb, {0: dst})

    def view(plan: RegistrationPlan, ts: dict[str, Any], region: int, offset: int,
             nbytes: int) -> Any:
        # adjacent tensors may share one registered region: find the tensor holding the bytes
        for t in spec.tensors:
            r, start = plan.place(t.name)
            if r == region and start <= offset < start + t.size_bytes:
                return ts[t.name][offset - start : offset - start + nbytes]
        raise RuntimeError(f"no tensor holds region {region} offset {offset}")

    pairs = [(view(pa, a, x.region, x.offset, x.nbytes), view(pb, b, y.region, y.offset, y.nbytes))
             for x, y in zip(local, remote)]
    best = float("inf")
    with torch.cuda.device(0):
        for _ in range(max(repeat, 10)):
            torch.cuda.synchronize("cuda:0")
            torch.cuda.synchronize("cuda:1")
            t0 = time.perf_counter()
            for s_, d_ in pairs:
                d_.copy_(s_, non_blocking=True)
            torch.cuda.synchronize("cuda:0")
            torch.cuda.synchronize("cuda:1")
            best = min(best, time.perf_counter() - t0)
    if _digest(spec, a, src) != _digest(spec, b, dst):
        raise RuntimeError("per-descriptor ceiling copy produced wrong bytes")
    nbytes = sum(x.nbytes for x in local)
    del a, b, pairs
    torch.cuda.empty_cache()
    return nbytes / best / 1e9


# untimed sends per (case, mode): in the first case of a process every CPU step of a send ran
# slower for a few requests (2x H200, run 16), and an IPC send captures its request shape's
# CUDA graph on the second send of that shape (kvtier.transfer.peer_rows)
WARMUP = 3


def _round(tx: Any, q: Any, out: Any, name: str, mode: str, parts: int, repeat: int,
           src: list[int], dst: list[int], expect: str) -> dict[str, Any]:
    """One (case, mode) row: `repeat` timed sends after WARMUP untimed ones, verified at the
    end.

    mode "request": send() per request, descriptor preparation and release included;
    mode "transfer": the handles prepared once (split into `parts`) and posted again per
    request, as an engine does for a fixed block table; the time runs from post to done;
    mode "packed": send_packed() per request (gather, one descriptor per staging slot,
    scatter), timed until the receiver has scattered the last chunk; "packed-ramp": the same
    with chunks ramped from slot / 8 (kvtier.transfer.pack_plan); mode "ipc": send_ipc() per
    request (one kernel into the receiver's memory mapped through CUDA IPC), timed until the
    completion notification is sent.
    """
    ids = [f"{name}-{mode}-{parts}-{i}" for i in range(repeat + WARMUP)]
    q.put(("case", name, ids, dst))
    if out.get(timeout=300)[0] != "ready":
        raise RuntimeError("receiver not ready")
    times: list[float] = []
    if mode == "request":
        reports = [tx.send(rid, {0: src}, {0: dst}) for rid in ids]
    elif mode == "ipc":
        reports, phases = [], []
        for rid in ids:
            reports.append(tx.send_ipc(rid, {0: src}, {0: dst}))
            phases.append(tx.last_phases)
    elif mode.startswith("packed"):
        reports, phases, timelines = [], [], []
        ramp, tx.ramp = tx.ramp, (8 if mode == "packed-ramp" else 0)
        try:
            for rid in ids:
                reports.append(tx.send_packed(rid, {0: src}, {0: dst}))
                phases.append(tx.last_phases)
                timelines.append(tx.last_timeline)
        finally:
            tx.ramp = ramp
    else:
        prepared = tx.prepare({0: src}, {0: dst}, parts=parts)
        try:
            reports = [tx.post(prepared, rid) for rid in ids]
        finally:
            tx.release(prepared)
    times = sorted(r.seconds for r in reports[WARMUP:])
    msg = out.get(timeout=300)
    if msg[0] != "case" or msg[2] != expect:
        raise RuntimeError(f"case {name}/{mode}: destination blocks differ: {msg}")
    nbytes = reports[0].nbytes
    row = {"case": name, "mode": mode, "parts": parts, "bytes": nbytes,
           "descriptors": reports[0].descriptors, "gbps": nbytes / times[0] / 1e9,
           "median_gbps": nbytes / times[len(times) // 2] / 1e9}
    if mode.startswith("packed") or mode == "ipc":  # mean seconds per phase, timed requests
        row["phases_ms"] = {k: 1e3 * sum(p[k] for p in phases[WARMUP:]) / max(repeat, 1)
                            for k in phases[0]}
    if mode.startswith("packed"):
        # per-chunk timeline of the median timed request (kvtier.transfer.nixl_packed_send)
        timed = sorted(range(WARMUP, len(reports)), key=lambda i: reports[i].seconds)
        row["timeline_ms"] = timelines[timed[len(timed) // 2]] if timed else []
    return row


def measure(device: str, geometry: str, tokens: int, repeat: int, parts: tuple[int, ...] = (1,),
            slot_mib: int = 128, workers: int = 1,
            rows_file: Path | None = None, programs: float = 0.0,
            modes: tuple[str, ...] = ("ipc", "request", "transfer", "packed", "packed-ramp"),
            ipc_programs: float = 0.0, ipc_spread: bool = False,
            ipc_graphs: bool = True) -> dict[str, Any]:
    """All rows; each row is appended to `rows_file` (JSON lines) as soon as it is measured,
    and a failing row ends the run with an "error" row, keeping those before it."""
    from kvtier.transfer.nixl_ipc import IpcSender

    spec, blocks = bench_spec(geometry, tokens)
    src_dev, dst_dev = ("cpu", "cpu") if device == "cpu" else ("cuda:0", "cuda:1")
    ceiling = _ceiling(spec.request_block_bytes(0) * blocks, device, repeat)
    # second ceiling, same bytes moved the same way as NIXL: one copy per descriptor
    same_copies: dict[str, float] = {}
    if device != "cpu":
        src_c, dst_c = _cases(blocks)["contiguous"]
        try:
            same_copies["contiguous"] = _copies_ceiling(spec, src_c, dst_c, repeat)
        except Exception as exc:  # a failed extra ceiling must not cost the NIXL rows
            print(f"pd: per-descriptor ceiling failed: {type(exc).__name__}: {exc}",
                  file=sys.stderr, flush=True)
    ctx = mp.get_context("spawn")
    q, out = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_receiver,
                       args=(geometry, tokens, dst_dev, workers, slot_mib, programs, q, out),
                       daemon=True)
    proc.start()
    rows: list[dict[str, Any]] = []
    graphs: dict[str, Any] = {}

    def emit(row: dict[str, Any]) -> None:
        row.update(ceiling_gbps=ceiling, ratio=row.get("gbps", 0.0) / ceiling)
        if row.get("case") in same_copies:
            same = same_copies[row["case"]]
            row.update(copies_ceiling_gbps=same, copies_ratio=row.get("gbps", 0.0) / same)
        rows.append(row)
        if rows_file is not None:
            with rows_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
        print(f"pd row: {json.dumps(row)}", file=sys.stderr, flush=True)

    try:
        host, port = q.get(timeout=300)
        tensors = _alloc(spec, src_dev, None)
        with IpcSender(spec, tensors, FP, slots=4, programs_per_sm=programs or None,
                       ipc_programs_per_sm=ipc_programs or None, ipc_spread=ipc_spread,
                       ipc_graphs=ipc_graphs,
                       timeout=120, backend_params=_params(workers)) as tx:
            tx.connect(host, port)
            if "ipc" in modes and tx.peer_rows is None:  # CPU, or no peer access
                print(f"pd: no ipc rows: {tx.ipc_unused}", file=sys.stderr, flush=True)
            plan = [(m, p) for m in modes for p in (parts if m == "transfer" else (1,))
                    if m != "ipc" or tx.peer_rows is not None]
            for name, (src, dst) in _cases(blocks).items():
                expect = _digest(spec, tensors, src)
                for mode, p in plan:
                    try:
                        emit(_round(tx, q, out, name, mode, p, repeat, src, dst, expect))
                    except Exception as exc:
                        emit({"case": name, "mode": mode, "parts": p,
                              "error": f"{type(exc).__name__}: {exc}"})
                        raise
            q.put(("done",))
            if tx.peer_rows is not None:
                graphs = {"captured": tx.peer_rows.graphs_captured,
                          "error": tx.peer_rows.graph_error}
    except Exception:
        if not rows or "error" not in rows[-1]:
            raise
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    return {"device": device, "geometry": geometry, "tokens": tokens, "blocks": blocks,
            "tensors": len(spec.tensors), "ucx_workers": workers,
            "pack_programs_per_sm": programs or "default",
            "ipc_programs_per_sm": ipc_programs or "default", "ipc_spread": ipc_spread,
            "ipc_graphs": ipc_graphs, "ipc_graphs_used": graphs,
            "ceiling": "local memcpy" if device == "cpu" else "peer copy GPU0->GPU1",
            "copies_ceiling_gbps": same_copies, "results": rows}


def machine(device: str) -> dict[str, Any]:
    import torch

    commit = provenance.commit()
    info: dict[str, Any] = {"host": platform.node(), "cpu": platform.processor() or
                            platform.machine(), "cores": os.cpu_count(),
                            "python": platform.python_version(), "torch": torch.__version__,
                            "date": datetime.now(UTC).strftime("%Y-%m-%d"),
                            "commit": commit or None, "ucx_tls": os.environ.get("UCX_TLS"),
                            "ucx_env": {k: v for k, v in sorted(os.environ.items())
                                        if k.startswith(("UCX_", "NIXL_UCX_"))},
                            "loadavg_1m": round(os.getloadavg()[0], 2)}
    if device == "cuda":
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"# kvtier bench pd ({doc['device']}, {doc['geometry']}, {doc['tokens']} tokens)",
             "", f"machine: `{json.dumps(doc['machine'])}`", "",
             f"ceiling: {doc['ceiling']} (one copy of all bytes)"
             + "".join(f"; {k} as one copy per descriptor: {v:.2f} GB/s"
                       for k, v in doc.get("copies_ceiling_gbps", {}).items()), "",
             "| case | mode | parts | MiB | descriptors | GB/s | median GB/s | ceiling GB/s "
             "| ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['mode']} | {r['parts']} | error: {r['error']} |")
            continue
        lines.append(f"| {r['case']} | {r['mode']} | {r['parts']} | {r['bytes'] / 2**20:.0f} | "
                     f"{r['descriptors']} | "
                     f"{r['gbps']:.2f} | {r['median_gbps']:.2f} | {r['ceiling_gbps']:.2f} | "
                     f"{r['ratio']:.0%}"
                     + (f" ({r['copies_ratio']:.0%} of same copies)" if "copies_ratio" in r
                        else "") + " |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= 2 else "cpu"
    if device == "cuda" and torch.cuda.device_count() < 2:
        print("kvtier bench pd: --device cuda needs 2 GPUs")
        return 2
    tokens = args.tokens or (1024 if device == "cpu" else 8192)
    parts = tuple(int(p) for p in str(args.parts).split(",") if p)
    rows_file = None
    if args.save:
        Path(args.save).mkdir(parents=True, exist_ok=True)
        rows_file = Path(args.save) / f"pd-{device}-w{args.workers}-rows.jsonl"
    modes = tuple(m for m in str(args.modes).split(",") if m)
    doc = measure(device, args.geometry, tokens, args.repeat, parts, args.slot_mib, args.workers,
                  rows_file, args.pack_programs, modes, args.ipc_programs, args.ipc_spread,
                  not args.ipc_direct)
    doc["machine"] = machine(device)
    text = markdown(doc)
    if args.save:
        stem = Path(args.save) / f"pd-{device}-w{args.workers}-{doc['machine']['date']}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
        stem.with_suffix(".md").write_text(text)
    print(json.dumps(doc) if args.json else text, end="" if not args.json else "\n")
    return 0


if __name__ == "__main__":  # `python -m kvtier.cli.bench_pd`, without the other benchmarks
    _parser = argparse.ArgumentParser(prog="kvtier bench pd")
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
