"""`kvtier bench transfer`: page transfers between engine KV tensors and host slots.

On a GPU, in one run: the pinned contiguous memcpy ceiling (D2H, H2D, both at once), a naive
per-page per-layer copy_ loop, index_select + staging + one DMA, one cudaMemcpyBatchAsync call,
and the copy engine on each available path (store, load, layer-wise load, both at once), as GB/s
and as a ratio to the ceiling. Without a GPU it measures the CPU path against a plain memcpy of
the same bytes. `--json` prints one JSON document instead of the table.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch

from kvtier.cli import provenance
from kvtier.geometry.spec import PRESETS, KVGeometry, preset

# Small-item geometries (4 KiB runs per layer per page): a 70B model at TP8, MLA with 4-token
# pages. They are bench-only shapes, not model presets.
EXTRA: dict[str, KVGeometry] = {
    "llama3-70b-tp8": KVGeometry(80, 1, 128, 16, "bfloat16"),
    "deepseek-v3-mla-p4": KVGeometry(61, 1, 576, 4, "bfloat16", mla=True),
}


# the GPU bench's engine variants (kept here so that --help works without a GPU)
ENGINE_VARIANTS = (
    "auto",
    "staged",
    "staged-batch",
    "staged-batch-b3",
    "staged-c64m",
    "staged-c8m",
    "store-staged+load-triton",
    "triton",
    "triton-grid-full",
    "triton-cta2",
    "triton-cta8",
    "store-triton+load-torch",
    "store-torch+load-triton",
    "torch",
    "dma",
    "auto+threads",
    "staged-batch+threads",
)


def _geometry(name: str) -> KVGeometry:
    return EXTRA[name] if name in EXTRA else preset(name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--geometry", default="llama3-8b", choices=sorted([*PRESETS, *EXTRA]), help="KV shape"
    )
    parser.add_argument("--pages", type=int, default=512, help="pages per job (default 512)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median)")
    parser.add_argument(
        "--paths",
        default=",".join(ENGINE_VARIANTS),
        help="engine variants to measure on a GPU (see bench_transfer_gpu.VARIANTS)",
    )
    parser.add_argument("--out", help="also write the JSON here, after every measured step")
    parser.add_argument(
        "--sweep-convert", action="store_true", help="GPU: time several Triton conversion tiles"
    )
    parser.add_argument(
        "--slots", choices=["random", "pool"], default="random",
        help="GPU: host slots of a job: random, or as the pool allocates them (ascending runs)",
    )
    parser.add_argument("--cpu", action="store_true", help="measure the CPU path even on a GPU")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _meta(g: KVGeometry, name: str, pages: int) -> dict[str, Any]:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    return {
        "benchmark": "transfer",
        "geometry": name,
        "geometry_fields": g.as_dict(),
        "pages": pages,
        "page_bytes": g.page_bytes,
        "item_bytes": g.chunk_bytes,
        "device": device or platform.machine(),
        "machine": platform.node(),
        "torch": torch.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": provenance.commit(),
    }


def _threaded_memcpy(dst: torch.Tensor, src: torch.Tensor, threads: int) -> Callable[[], None]:
    """The CPU ceiling: `src` copied to `dst` by `threads` plain memcpys (numpy, GIL released),
    as many threads as the CPU path may use. Not torch's copy_: that runs on an OpenMP team
    whose workers spin for milliseconds after it returns (libgomp's default), which took a core
    from the step timed next on a 2-core machine (4 KiB-row stores 0.43-0.51 after copy_,
    0.57-0.76 after this copy at the same 16-19 GB/s)."""
    from concurrent.futures import ThreadPoolExecutor

    d, s = dst.numpy(), src.numpy()
    edges = [len(d) * i // threads for i in range(threads + 1)]
    parts = list(itertools.pairwise(edges))
    pool = ThreadPoolExecutor(max(1, threads - 1))

    def copy() -> None:
        futures = [pool.submit(np.copyto, d[a:b], s[a:b]) for a, b in parts[1:]]
        np.copyto(d[parts[0][0] : parts[0][1]], s[parts[0][0] : parts[0][1]])
        for f in futures:
            f.result()

    return copy


def run_cpu(g: KVGeometry, pages: int, reps: int) -> dict[str, Any]:
    """The CPU path against a plain memcpy of the same bytes (see _threaded_memcpy)."""
    from kvtier.memory.host_pool import HostPool
    from kvtier.transfer import native
    from kvtier.transfer.device_kv import DeviceKV
    from kvtier.transfer.engine import CopyEngine
    from kvtier.transfer.torch_path import move_dtype

    nb = 2 * pages
    move = move_dtype(g.itemsize)
    shape = (
        (nb, g.page_size, g.head_size)
        if g.mla
        else (2, nb, g.page_size, g.num_kv_heads, g.head_size)
    )
    layers = [torch.randint(-(2**7), 2**7, shape).to(move) for _ in range(g.num_layers)]
    dkv = DeviceKV.from_vllm(layers, g, g.page_size)
    pool = HostPool(nb, g.page_bytes, pin=False)
    pool.payloads().fill_(1)  # fault the pages in before timing
    eng = CopyEngine(dkv, pool, path="cpu")
    perm = torch.randperm(nb)
    blocks, slots = perm[:pages].view(-1, 1), torch.randperm(nb)[:pages].tolist()
    n = pages * g.page_bytes
    src = torch.empty(n, dtype=torch.uint8).fill_(3)
    dst = torch.empty(n, dtype=torch.uint8).fill_(4)
    threads = min(4, torch.get_num_threads())
    ceiling_copy = _threaded_memcpy(dst, src, threads)

    def store() -> None:
        eng.wait(eng.submit_store(blocks, slots))

    def load() -> None:
        eng.wait(eng.submit_load(slots, blocks))

    # Interleaved, so that the memcpy ceiling and the engine see the same machine load.
    fns = {"memcpy": ceiling_copy, "store": store, "load": load}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(reps + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if rep:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    memcpy, store_gbs, load_gbs = (n / statistics.median(times[k]) / 1e9 for k in fns)
    # the C row copier, or torch/numpy where it is not built or KVTIER_NATIVE=0
    name = "cpu" if native.library() is not None else "cpu torch"
    return {
        "mode": "cpu",
        "ceiling": {"memcpy": memcpy},
        "ratio_method": f"median of {reps} interleaved runs; ceiling: memcpy on {threads} threads",
        "engine": {name: {"store": store_gbs, "load": load_gbs}},
        "ratios": {name: {"store": store_gbs / memcpy, "load": load_gbs / memcpy}},
        "goal": {"cpu_vs_memcpy": 0.5},
    }


def _ratios(res: dict[str, Any]) -> None:
    """Fill the ratio-of-medians tables of `res` from what is measured so far (the paired
    ratios, which the table and the README report, are filled as each step is measured)."""
    from kvtier.cli.bench_transfer_gpu import CEILING_OF

    ceil = res["ceiling"]
    for group, out, ref in (
        ("engine", "median_ratios", CEILING_OF),
        ("baselines", "baseline_median_ratios", CEILING_OF),
        ("conversion", "conversion_median_ratios", None),
    ):
        res[out] = {
            name: {op: v / ceil[ref[op] if ref else "device_copy"] for op, v in r.items()}
            for name, r in res[group].items()
        }


def run_gpu(
    g: KVGeometry,
    pages: int,
    reps: int,
    paths: list[str],
    emit: Callable[[dict[str, Any]], None] = lambda res: None,
    sweep_convert: bool = False,
    slots: str = "random",
) -> dict[str, Any]:
    """Every GPU measurement; `emit(res)` runs after each step, so a run cut short keeps what it
    measured. A wrong byte is recorded under errors as WRONG and sets res["wrong"]."""
    from kvtier.cli import bench_transfer_gpu as gb
    from kvtier.cli.bench_convert_gpu import conversion_rates

    st = gb.make_setup(g, pages, slots=slots)
    ceilings = gb.Ceilings(st.nbytes)
    ceil = ceilings.rates(reps)
    res: dict[str, Any] = {
        "mode": "gpu",
        "slots": slots,
        "ceiling": ceil,
        "one_way_ceiling": min(ceil["d2h"], ceil["h2d"]),
        "ratio_method": "median of per-pair ratios (each run paired with a ceiling copy)",
        "baselines": {},
        "engine": {},
        "conversion": {},
        "ratios": {},
        "baseline_ratios": {},
        "conversion_ratios": {},
        "errors": {},
        "wrong": False,
    }

    def step(name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except AssertionError as exc:  # wrong data: recorded loudly, the other steps still run
            res["errors"][name], res["wrong"] = f"WRONG: {exc}", True
        except Exception as exc:  # a path missing here is reported, not fatal
            res["errors"][name] = f"{type(exc).__name__}: {exc}"
        _ratios(res)
        emit(res)

    def engine(path: str) -> None:
        r = gb.engine_rates(st, ceilings, path, reps)
        res["engine"][path], res["ratios"][path] = r.gbps, r.ratios
        res.setdefault("both_timeline_ms", {})[path] = r.notes

    def baselines() -> None:
        for name, r in gb.baselines(st, ceilings, reps).items():
            res["baselines"][name], res["baseline_ratios"][name] = r.gbps, r.ratios

    def conversion() -> None:
        rates, ratios = conversion_rates(g, pages, ceilings, reps, sweep_convert)
        res["conversion"].update(rates)
        res["conversion_ratios"].update(ratios)

    step("baselines", baselines)
    for path in paths:
        if not gb.known_variant(path):
            res["errors"][path] = f"unknown variant (known: {', '.join(gb.VARIANTS)})"
            continue
        step(path, functools.partial(engine, path))
    step("conversion", conversion)
    return res


def _table(res: dict[str, Any]) -> str:
    m = res["meta"]
    lines = [
        f"kvtier bench transfer  {m['geometry']}  {m['pages']} pages x {m['page_bytes']} B"
        f"  item {m['item_bytes']} B  on {m['device']}  ({m['commit']})",
        "ceiling: " + "  ".join(f"{k} {v:.1f} GB/s" for k, v in res["ceiling"].items()),
        f"{'what':36} {'op':15} {'GB/s':>8} {'ratio':>7}",
    ]
    groups = (
        ("baselines", "baseline_ratios", "{}"),
        ("engine", "ratios", "kvtier engine [{}]"),
        ("conversion", "conversion_ratios", "convert {} (vs device copy)"),
    )
    for group, rgroup, fmt in groups:
        for name, ops in res.get(group, {}).items():
            label = fmt.format(name)
            for op, v in ops.items():
                r = res.get(rgroup, {}).get(name, {}).get(op)
                ratio = f"{r:7.2f}" if r is not None else "      -"
                lines.append(f"{label:36} {op:15} {v:8.2f} {ratio}")
    for path, err in res.get("errors", {}).items():
        lines.append(f"kvtier engine [{path}] not measured: {err}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    g = _geometry(args.geometry)
    pages = int(args.pages)
    meta = _meta(g, args.geometry, pages)

    def emit(res: dict[str, Any]) -> None:
        if args.out:
            res["meta"] = meta
            tmp = f"{args.out}.tmp"
            with open(tmp, "w") as f:
                json.dump(res, f, indent=2)
            os.replace(tmp, args.out)

    if torch.cuda.is_available() and not args.cpu:
        paths = [p.strip() for p in args.paths.split(",") if p.strip()]
        res = run_gpu(g, pages, args.reps, paths, emit, args.sweep_convert, args.slots)
    else:
        res = run_cpu(g, pages, args.reps)
    res["meta"] = meta
    emit(res)
    if args.json:
        json.dump(res, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(_table(res))
    if res.get("wrong"):
        print("kvtier bench transfer: WRONG DATA (see errors)", file=sys.stderr)
        return 1
    return 0
