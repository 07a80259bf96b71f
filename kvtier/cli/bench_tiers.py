"""`kvtier bench tiers [--json]`: secondary-tier throughput against raw clients and disk I/O.

For 1-2 MiB page blobs, each tier stores and loads the same pages as its store's own client does
in the same run (raw redis-py pipelined SET/MGET, raw Mooncake batch put/get from the same
buffers, raw pwrite/preadv of a slab file at the disk and NIXL tiers' slot offsets: see
bench_tiers_nixl), and the disk tier is also set against dd-like
sequential write+fsync/read of the same bytes. Servers are started on loopback by the bench;
a tier whose server is not installed is skipped with a note. Goals: tier >= 80% of raw, disk
tier >= 80% of sequential.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvtier.cli import bench_tiers_run as m
from kvtier.cli import provenance
from kvtier.cli.servers import MooncakeMaster, RedisServer, ServerUnavailable
from kvtier.errors import KVTierError
from kvtier.keys import verify
from kvtier.tiers.base import ThreadedTier
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.registry import make_tier

GOAL = 0.8
ALL = ("disk", "redis", "mooncake", "nixl")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--tiers", default=",".join(ALL), help="comma list of " + ",".join(ALL))
    parser.add_argument("--page-mib", type=float, default=2.0, help="page payload size (MiB)")
    parser.add_argument("--pages", type=int, default=64, help="pages per pass")
    parser.add_argument("--batch", type=int, default=16, help="pages per tier job / raw batch")
    parser.add_argument("--repeat", type=int, default=5, help="passes per measurement (best)")
    parser.add_argument("--dir", default=None, help="disk tier directory (default: a temp dir)")
    parser.add_argument("--save", default=None, metavar="DIR",
                        help="also write tiers-<date>.json and .md into DIR (e.g. bench/results)")


def bench_disk(args: argparse.Namespace, pages: m.Pages, base: str) -> list[m.Row]:
    tdir, raw = os.path.join(base, "tier"), os.path.join(base, "raw.slab")
    seq = os.path.join(base, "seq")
    tier = make_tier("disk", "disk", {"path": tdir, "budget": 4 * pages.total, "fsync": True,
                                      "max_inflight": 64}, pages.ctx)
    assert isinstance(tier, DiskTier)
    src, dst, rep, n = pages.sources(), pages.targets(), args.repeat, pages.total
    stride = tier.slabs.slot_bytes
    slabs = [tier.slabs.slab_path(i) for i in range(tier.slabs.slabs)]

    def clear_tier() -> None:
        tier.remove(pages.keys)

    def cold(paths: list[str]) -> None:
        pages.scrub_targets()
        m.drop_page_cache(paths)

    chunk = memoryview(bytearray(m.SEQ_CHUNK))
    try:
        # the tier runs last in each round: the load check below sees the tier's bytes
        r_store, s_write, t_store = m.interleaved(n, rep, [
            (lambda: m.raw_slab_store(raw, stride, src, args.batch), None),
            (lambda: m.seq_write(seq, n, chunk), None),
            (lambda: m.tier_pass(tier, "store", src, args.batch), clear_tier),
        ])
        r_load, s_read, t_load = m.interleaved(n, rep, [
            (lambda: m.raw_slab_load(raw, stride, dst), lambda: cold([raw])),
            (lambda: m.seq_read(seq, chunk), lambda: m.drop_page_cache([seq])),
            (lambda: m.tier_pass(tier, "load", dst, args.batch), lambda: cold(slabs)),
        ])
        pages.check_loaded()
        tier.check_integrity()
    finally:
        tier.close()
    what = "pwrite (fdatasync per batch) / preadv per page at the same slot offsets"
    return [
        m.Row("disk", "store", pages.n, pages.blob_bytes, t_store, r_store, what, s_write),
        m.Row("disk", "load", pages.n, pages.blob_bytes, t_load, r_load, what, s_read),
    ]


def bench_redis(args: argparse.Namespace, pages: m.Pages) -> list[m.Row]:
    import redis

    srv = RedisServer.start()
    tier = make_tier("redis", "redis", {"url": srv.url, "max_inflight": 64}, pages.ctx)
    assert isinstance(tier, ThreadedTier)
    client = redis.Redis.from_url(srv.url)
    src, dst, rep, n = pages.sources(), pages.targets(), args.repeat, pages.total
    names = [b"raw:" + k.hex().encode() for k in pages.keys]

    def raw_store() -> None:
        for i in range(0, pages.n, args.batch):
            pipe = client.pipeline(transaction=False)
            for name, (_, buf) in zip(names[i : i + args.batch], src[i : i + args.batch]):
                pipe.set(name, buf)
            pipe.execute()

    def raw_load() -> None:
        for i in range(0, pages.n, args.batch):
            values = client.mget(names[i : i + args.batch])
            if any(v is None for v in values):
                raise AssertionError("raw redis GET missed")

    try:
        r_store, t_store = m.interleaved(n, rep, [
            (raw_store, None), (lambda: m.tier_pass(tier, "store", src, args.batch), None),
        ])
        r_load, t_load = m.interleaved(n, rep, [
            (raw_load, None),
            (lambda: m.tier_pass(tier, "load", dst, args.batch), pages.scrub_targets),
        ])
        pages.check_loaded()
    finally:
        tier.close()
        client.close()
        srv.stop()
    raw = "redis-py pipelined SET / MGET"
    return [
        m.Row("redis", "store", pages.n, pages.blob_bytes, t_store, r_store, raw),
        m.Row("redis", "load", pages.n, pages.blob_bytes, t_load, r_load, raw),
    ]


def bench_mooncake(args: argparse.Namespace, pages: m.Pages) -> list[m.Row]:
    from kvtier.tiers.mooncake import MooncakeTier

    srv = MooncakeMaster.start()
    seg = max(512 << 20, 3 * pages.total)
    tier = make_tier("mooncake", "mooncake", {"master": srv.addr, "global_segment_size": seg,
                                              "max_inflight": 64}, pages.ctx)
    assert isinstance(tier, MooncakeTier)
    src, dst, rep, n = pages.sources(), pages.targets(), args.repeat, pages.total
    names = ["raw:" + k.hex() for k in pages.keys]

    def raw(op: str) -> Callable[[], None]:
        def go() -> None:
            store = tier._client()
            items = src if op == "put" else dst
            for i in range(0, pages.n, args.batch):
                part = items[i : i + args.batch]
                ptrs = [m.np_addr(buf) for _, buf in part]
                sizes = [len(buf) for _, buf in part]
                if op == "put":
                    codes = store.batch_upsert_from(names[i : i + args.batch], ptrs, sizes)
                    bad = [c for c in codes if c != 0]
                else:
                    codes = store.batch_get_into(names[i : i + args.batch], ptrs, sizes)
                    bad = [c for c, s in zip(codes, sizes) if c != s]
                if bad:
                    raise AssertionError(f"raw mooncake {op} failed: {bad[:3]}")
        return go

    try:
        if not tier.ready:
            raise ServerUnavailable("mooncake client did not connect")
        r_store, t_store = m.interleaved(n, rep, [
            (raw("put"), None), (lambda: m.tier_pass(tier, "store", src, args.batch), None),
        ])
        r_load, t_load = m.interleaved(n, rep, [
            (raw("get"), None),
            (lambda: m.tier_pass(tier, "load", dst, args.batch), pages.scrub_targets),
        ])
        pages.check_loaded()
    finally:
        tier.close()
        srv.stop()
    what = "mooncake batch_upsert_from / batch_get_into"
    return [
        m.Row("mooncake", "store", pages.n, pages.blob_bytes, t_store, r_store, what),
        m.Row("mooncake", "load", pages.n, pages.blob_bytes, t_load, r_load, what),
    ]


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "commit": provenance.commit(),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}


def table(rows: list[m.Row], notes: list[str], info: dict[str, Any]) -> str:
    out = [f"kvtier bench tiers - {info['date']} - commit {info['commit']} - "
           f"{info['cores']} cores {info['cpu']}", "",
           "| tier | op | pages x MiB | tier GB/s | raw GB/s | tier/raw | raw+verify GB/s "
           "| seq GB/s | tier/seq |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        seq = f"{r.seq_gbs:.2f}" if r.seq_gbs else "-"
        sr = f"{r.seq_ratio:.0%}" if r.seq_ratio is not None else "-"
        rv = f"{r.verified_raw_gbs:.2f}" if r.verified_raw_gbs else "-"
        out.append(f"| {r.tier} | {r.op} | {r.pages} x {r.blob_bytes / 2**20:.2f} | "
                   f"{r.tier_gbs:.2f} | {r.raw_gbs:.2f} | {r.ratio:.0%} | {rv} | {seq} | {sr} |")
    out += ["", "raw: " + "; ".join(sorted({f"{r.tier}: {r.raw_what}" for r in rows}))]
    out += [f"note: {n}" for n in notes]
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    wanted = [t.strip() for t in args.tiers.split(",") if t.strip()]
    unknown = sorted(set(wanted) - set(ALL))
    if unknown:
        print(f"unknown tiers {unknown}; choose from {ALL}", file=sys.stderr)
        return 2
    payload = int(args.page_mib * 2**20) - 64  # blob = header + payload = page-mib MiB
    pages = m.Pages(args.pages, payload, os.urandom(16))
    rows: list[m.Row] = []
    notes: list[str] = []
    base = tempfile.mkdtemp(prefix="kvtier-bench-", dir=args.dir or "/var/tmp")
    try:
        for name in wanted:
            try:
                if name == "disk":
                    rows += bench_disk(args, pages, base)
                elif name == "redis":
                    rows += bench_redis(args, pages)
                elif name == "mooncake":
                    rows += bench_mooncake(args, pages)
                else:
                    from kvtier.cli.bench_tiers_nixl import bench_nixl

                    rows += bench_nixl(args, pages, base)
            except (ServerUnavailable, ImportError, KVTierError) as exc:
                notes.append(f"{name} skipped: {exc}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    # loads verify every blob (xxh3 over the payload): the cost a raw client does not pay
    src = pages.sources()
    fp, plen = pages.ctx.fingerprint, pages.ctx.payload_bytes
    verify_gbs = m.best_gbs(pages.total, lambda: [verify(b, fp, k, plen) for k, b in src], 3)
    notes.append(f"blob verification alone (one thread): {verify_gbs:.2f} GB/s; every tier load "
                 "verifies each page, a raw client does not")
    rows = [dataclasses.replace(r, verify_gbs=verify_gbs) if r.op == "load" else r for r in rows]
    info = machine()
    doc = {"benchmark": "tiers", **info, "goal_ratio": GOAL, "notes": notes,
           "verify_gbs": verify_gbs,
           "config": {"pages": args.pages, "blob_bytes": pages.blob_bytes, "batch": args.batch,
                      "repeat": args.repeat, "disk_dir": args.dir or "/var/tmp"},
           "results": [{**r.__dict__, "ratio": r.ratio, "seq_ratio": r.seq_ratio,
                        "verified_raw_gbs": r.verified_raw_gbs} for r in rows]}
    text = table(rows, notes, info)
    print(json.dumps(doc, indent=2) if args.json else text)
    if args.save:
        out = Path(args.save)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"tiers-{info['date'][:10]}"
        stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
        stem.with_suffix(".md").write_text(f"# Secondary tiers\n\n{text}\n")
    return 0
