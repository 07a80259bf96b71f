"""The nixl tier in `kvtier bench tiers`: NIXL POSIX slab I/O against raw pwrite/pread.

`bench_nixl(args, pages, base)` returns rows like the other tiers' benches. Its raw baseline is
the same bytes written with os.pwrite into a slab file at the same slot offsets and read back
with os.preadv: what the POSIX backend does, without NIXL. NIXL does not fsync, so neither
store pass flushes (both measure writes into the page cache); both loads start cold (page
cache flushed and dropped first).
"""

from __future__ import annotations

import argparse
import os

from kvtier.cli import bench_tiers_run as m
from kvtier.tiers.nixl import NixlTier
from kvtier.tiers.nixl_io import FileSlots
from kvtier.tiers.registry import make_tier


def bench_nixl(args: argparse.Namespace, pages: m.Pages, base: str,
               io: str = "aio") -> list[m.Row]:
    """Store then load `pages` through a nixl tier (POSIX backend) and the raw baseline."""
    tdir = os.path.join(base, "nixl")
    raw = os.path.join(base, "nixl-raw.slab")
    tier = make_tier("nixl", "nixl", {"path": tdir, "budget": 2 * pages.total, "io": io,
                                      "max_inflight": 64}, pages.ctx)
    assert isinstance(tier, NixlTier) and isinstance(tier.store, FileSlots)
    store = tier.store
    slabs = [store.slab_path(i) for i in range(len(store.fds))]
    src, dst, rep, n = pages.sources(), pages.targets(), args.repeat, pages.total
    stride = store.slot_bytes

    def cold(paths: list[str]) -> None:
        pages.scrub_targets()
        m.drop_page_cache(paths)

    try:
        t_store = m.best_gbs(n, lambda: m.tier_pass(tier, "store", src, args.batch), rep,
                             lambda: tier.remove(pages.keys))
        t_load = m.best_gbs(n, lambda: m.tier_pass(tier, "load", dst, args.batch), rep,
                            lambda: cold(slabs))
        pages.check_loaded()
        r_store = m.best_gbs(n, lambda: m.raw_slab_store(raw, stride, src), rep)
        r_load = m.best_gbs(n, lambda: m.raw_slab_load(raw, stride, dst), rep, lambda: cold([raw]))
        pages.check_loaded()
        tier.check_integrity()
    finally:
        tier.close()
    what = "pwrite/preadv at the same slot offsets"
    return [
        m.Row("nixl", "store", pages.n, pages.blob_bytes, t_store, r_store, what),
        m.Row("nixl", "load", pages.n, pages.blob_bytes, t_load, r_load, what),
    ]
