"""`kvtier segments | limit | shared | top`: inspect and steer segments of elastic GPU memory.

    kvtier segments [--json]            list segments (owners, limit, usage per GPU)
    kvtier segments gc                  remove segments whose processes are all dead
    kvtier limit <segment> <size|none>  cap a segment's mapped bytes over all GPUs
    kvtier shared set <segment> <gpu> <size>   budget on a peer GPU (0 removes it)
    kvtier shared show [<segment>] [--json]
    kvtier top [--once] [--interval S]  live view: segments, usage per GPU, tier hit rates

Bad input prints one line on stderr, exits 2 and changes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from kvtier.errors import ConfigError, KVTierError
from kvtier.memory.segments import SegmentRegistry, SegmentState
from kvtier.units import format_size, parse_size


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segments", help="list segments of elastic GPU memory; `segments gc`")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    ssub = p.add_subparsers(dest="segments_cmd", metavar="ACTION")
    gc = ssub.add_parser("gc", help="remove segments whose owner processes are dead")
    gc.set_defaults(func=_cmd_gc)
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("limit", help="set a segment's byte limit over all GPUs")
    p.add_argument("segment")
    p.add_argument("size", help="e.g. 512M, 8G, 1.5GiB, 1024; 'none' removes the limit")
    p.set_defaults(func=_cmd_limit)

    p = sub.add_parser("shared", help="shared-GPU budgets of a segment")
    shsub = p.add_subparsers(dest="shared_cmd", metavar="ACTION", required=True)
    s = shsub.add_parser("set", help="budget on a peer GPU (0 removes it)")
    s.add_argument("segment")
    s.add_argument("gpu")
    s.add_argument("size")
    s.set_defaults(func=_cmd_shared_set)
    s = shsub.add_parser("show", help="show shared-GPU budgets")
    s.add_argument("segment", nargs="?")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_shared_show)

    p = sub.add_parser("top", help="live view of segments, GPU usage and tier hit rates")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument("--interval", type=float, default=1.0, help="refresh period, seconds")
    p.set_defaults(func=_cmd_top)


def _fail(command: str, message: str) -> int:
    print(f"kvtier {command}: error: {message}", file=sys.stderr)
    return 2


def _gpu_count() -> int:
    """Devices on this host (0 when torch or CUDA is missing)."""
    try:
        import torch

        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def _state_json(state: SegmentState) -> dict[str, object]:
    data = state.to_json()
    data["alive"] = state.alive()
    return data


# -- segments ---------------------------------------------------------------------------------
def _cmd_list(args: argparse.Namespace) -> int:
    states = SegmentRegistry().segments()
    if args.json:
        print(json.dumps([_state_json(s) for s in states], indent=1, sort_keys=True))
        return 0
    if not states:
        print("no segments")
        return 0
    print(f"{'SEGMENT':<20} {'PIDS':<16} {'GPU':>3} {'LIMIT':>9} {'USED':>9}  USAGE PER GPU")
    for s in states:
        pids = ",".join(str(p) for p in s.pids) + ("" if s.alive() else " (dead)")
        used = sum(b for _, b in s.usage)
        per = " ".join(f"{g}:{format_size(b)}" for g, b in s.usage) or "-"
        limit = format_size(s.limit) if s.limit is not None else "-"
        print(f"{s.name:<20} {pids:<16} {s.local_gpu:>3} {limit:>9} {format_size(used):>9}  {per}")
    return 0


def _cmd_gc(args: argparse.Namespace) -> int:
    removed = SegmentRegistry().gc()
    print(f"removed {len(removed)} segment(s)" + (": " + ", ".join(removed) if removed else ""))
    return 0


# -- limit / shared ---------------------------------------------------------------------------
def _cmd_limit(args: argparse.Namespace) -> int:
    reg = SegmentRegistry()
    try:
        reg.get(args.segment)
        limit = None if args.size.lower() in ("none", "unlimited") else parse_size(args.size)
        state = reg.set_limit(args.segment, limit)
    except KVTierError as exc:
        return _fail("limit", str(exc))
    print(f"{state.name}: limit {format_size(state.limit) if state.limit is not None else 'none'}")
    return 0


def _cmd_shared_set(args: argparse.Namespace) -> int:
    reg = SegmentRegistry()
    try:
        state = reg.get(args.segment)
        try:
            gpu = int(args.gpu)
        except ValueError:
            raise ConfigError("gpu", args.gpu, "a GPU ordinal (0, 1, ...)") from None
        count = max(state.device_count, _gpu_count())
        if not 0 <= gpu < count or gpu == state.local_gpu:
            raise ConfigError("gpu", gpu, f"a GPU 0..{count - 1} other than the segment's "
                                          f"local GPU {state.local_gpu}")
        nbytes = parse_size(args.size)
        if count > state.device_count:  # the host has more GPUs than the segment recorded
            from dataclasses import replace

            reg.update(args.segment, lambda s: replace(s, device_count=count))
        state = reg.set_shared(args.segment, gpu, nbytes)
    except KVTierError as exc:
        return _fail("shared set", str(exc))
    print(f"{state.name}: shared " + (_shared_text(state) or "none"))
    return 0


def _shared_text(state: SegmentState) -> str:
    return " ".join(f"gpu{g}={format_size(b)}" for g, b in state.shared)


def _cmd_shared_show(args: argparse.Namespace) -> int:
    reg = SegmentRegistry()
    try:
        states = [reg.get(args.segment)] if args.segment else reg.segments()
    except KVTierError as exc:
        return _fail("shared show", str(exc))
    if args.json:
        print(json.dumps({s.name: {str(g): b for g, b in s.shared} for s in states}, indent=1))
        return 0
    for s in states:
        print(f"{s.name}: local gpu{s.local_gpu}; shared {_shared_text(s) or 'none'}")
    return 0


# -- top --------------------------------------------------------------------------------------
def render_top(reg: SegmentRegistry) -> str:
    """One frame of `kvtier top`."""
    states = reg.segments()
    lines = [time.strftime("kvtier top  %H:%M:%S") + f"  run dir {reg.run_dir}", ""]
    per_gpu: dict[int, int] = {}
    for s in states:
        for g, b in s.usage:
            per_gpu[g] = per_gpu.get(g, 0) + b
    lines.append("GPU usage: " + (" ".join(f"gpu{g}={format_size(b)}"
                                           for g, b in sorted(per_gpu.items())) or "none"))
    lines.append("")
    lines.append(f"{'SEGMENT':<20} {'ALIVE':<5} {'LIMIT':>9} {'USED':>9}  TIERS (hit rate)")
    for s in states:
        used = sum(b for _, b in s.usage)
        limit = format_size(s.limit) if s.limit is not None else "-"
        tiers = []
        for tier, c in reg.read_stats(s.name).items():
            hits, misses = float(c.get("hits", 0)), float(c.get("misses", 0))
            rate = f"{100 * hits / (hits + misses):.1f}%" if hits + misses else "-"
            tiers.append(f"{tier}={rate}")
        alive = "yes" if s.alive() else "no"
        lines.append(f"{s.name:<20} {alive:<5} {limit:>9} {format_size(used):>9}  "
                     + (" ".join(tiers) or "-"))
    if not states:
        lines.append("(no segments)")
    return "\n".join(lines)


def _cmd_top(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        return _fail("top", f"--interval: got {args.interval}; expected a positive number")
    reg = SegmentRegistry()
    if args.once:
        print(render_top(reg))
        return 0
    try:
        while True:
            sys.stdout.write("\x1b[H\x1b[2J" + render_top(reg) + "\n")
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
