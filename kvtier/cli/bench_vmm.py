"""`kvtier bench vmm`: elastic device-pool timings against the goals of the design brief.

Rows: steady-state allocation per 2 MiB page (from the pre-mapped reserve; goal <= 10 us), cold
map per page (create + map + access; goal <= 150 us), a GPU kernel reading pages that live on
the peer GPU against the same run's peer memcpy (goal >= 90%), and SDPA decode attention over
elastic layer-first KV against a static tensor (goal within 2%). Without a GPU only the
simulated backend's allocator timings run and the GPU rows say why they were skipped.

Every row is recorded as soon as it is measured (`--out FILE` rewrites the JSON file after each
one), and each section runs on its own: a section that raises leaves its earlier rows, adds a
"FAILED" row naming the error, and the command exits 1 after the remaining sections ran.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from kvtier.cli import provenance
from kvtier.memory.elastic import ElasticPool
from kvtier.memory.elastic_layout import ElasticLayout
from kvtier.memory.vmm_backend import PAGE_BYTES, DeviceBackend
from kvtier.memory.vmm_sim import SimBackend

Row = dict[str, Any]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print rows as JSON")
    parser.add_argument("--out", default=None,
                        help="JSON file rewritten after every measured row")
    parser.add_argument("--pages", type=int, default=256, help="pages per allocation timing")
    parser.add_argument("--sim", action="store_true", help="simulated backend only")
    parser.add_argument("--peer-mib", type=int, default=1024, help="bytes read from the peer")
    parser.add_argument("--attn-seqs", type=int, default=16, help="sequences in the SDPA test")
    parser.add_argument("--attn-tokens", type=int, default=4096, help="context per sequence")


def row(name: str, value: float | None, unit: str, goal: str, ok: bool | None,
        note: str = "") -> Row:
    return {"name": name, "value": value, "unit": unit, "goal": goal, "ok": ok, "note": note}


def alloc_rows(backend: DeviceBackend, pages: int, label: str) -> Iterator[Row]:
    """Steady-state and cold allocation of one 2 MiB page (one block = one page)."""
    lay = ElasticLayout(regions=1, chunk_bytes=PAGE_BYTES, num_blocks=pages)
    pool = ElasticPool(backend, lay, 0, reserve_slots=pages, zero_fill=False)
    try:
        pool.maintain()  # pre-map the whole reserve
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            blocks = [pool.alloc(1)[0] for _ in range(pages)]
            times.append((time.perf_counter() - t0) / pages * 1e6)
            pool.free(blocks)
        v = statistics.median(times)
    finally:
        pool.close()
    yield row(f"{label}: steady alloc per 2 MiB page", v, "us", "<= 10", v <= 10)
    for zero_fill in (False, True):
        pool = ElasticPool(backend, lay, 0, reserve_slots=0, zero_fill=zero_fill)
        try:
            t0 = time.perf_counter()
            blocks = [pool.alloc(1)[0] for _ in range(pages)]
            cold = (time.perf_counter() - t0) / pages * 1e6
            t0 = time.perf_counter()
            pool.free(blocks)  # K=0: every page goes back to the driver
            back = (time.perf_counter() - t0) / pages * 1e6
        finally:
            pool.close()
        what = "zero page swapped" if zero_fill else "no zero fill"
        yield row(f"{label}: cold map per page ({what})", cold, "us", "<= 150", cold <= 150)
        yield row(f"{label}: release per page ({what})", back, "us", "-", None)


def sim_rows(pages: int) -> Iterator[Row]:
    be = SimBackend([(pages + 2) * PAGE_BYTES])
    return alloc_rows(be, pages, "sim")


class Recorder:
    """Collects rows; with `path`, rewrites the JSON file (atomically) after every row so a
    later crash or timeout still leaves every number measured so far."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.rows: list[Row] = []
        self.failed: list[str] = []
        self.meta: dict[str, Any] = {"bench": "vmm", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                     "device": _device_name(), "commit": _commit()}
        self._flush()

    def add(self, r: Row) -> None:
        self.rows.append(r)
        self._flush()

    def section(self, name: str, rows: Callable[[], Iterable[Row]]) -> bool:
        """Record every row `rows()` yields; on an exception print the traceback to stderr,
        record a FAILED row naming the error and return False instead of raising."""
        try:
            for r in rows():
                self.add(r)
            return True
        except Exception as exc:  # one broken section must not hide the others
            traceback.print_exc(file=sys.stderr)
            self.failed.append(name)
            self.add(row(f"{name}: FAILED", None, "", "", False,
                         f"{type(exc).__name__}: {exc}"[:2000]))
            return False

    def document(self) -> dict[str, Any]:
        return {**self.meta, "failed": self.failed, "rows": self.rows}

    def _flush(self) -> None:
        if self.path is None:
            return
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.document(), f, indent=1)
            f.write("\n")
        os.replace(tmp, self.path)


def run(args: argparse.Namespace) -> int:
    rec = Recorder(args.out)
    rec.section("sim alloc", lambda: sim_rows(min(args.pages, 256)))
    gpu_note = ""
    if not args.sim:
        try:
            import torch

            has_gpu = torch.cuda.is_available()
        except ImportError:
            has_gpu = False
        if has_gpu:
            from kvtier.cli.bench_vmm_gpu import run_gpu

            run_gpu(rec, args)
        else:
            gpu_note = "GPU rows skipped: no CUDA device"
    else:
        gpu_note = "GPU rows skipped: --sim"
    if gpu_note:
        rec.add(row("cuda rows", None, "", "", None, gpu_note))
    if args.json:
        print(json.dumps(rec.document(), indent=1))
    else:
        print(format_table(rec.rows))
    if rec.failed:
        print(f"bench vmm: failed sections: {', '.join(rec.failed)}", file=sys.stderr)
    # missed goals are reported in the table; wrong results and errors fail the command
    return 1 if rec.failed else 0


def _device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            return f"{n} x {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return "cpu (simulated backend)"


def _commit() -> str:
    return provenance.commit(short=False)


def format_table(rows: list[Row]) -> str:
    lines = [f"{'measure':<58} {'value':>10} {'unit':<5} {'goal':<8} ok   note"]
    for r in rows:
        value = "-" if r["value"] is None else f"{r['value']:.2f}"
        ok = {True: "yes", False: "NO", None: "-"}[r["ok"]]
        lines.append(f"{r['name']:<58} {value:>10} {r['unit']:<5} {r['goal']:<8} {ok:<4} "
                     f"{r['note']}")
    return "\n".join(lines)
