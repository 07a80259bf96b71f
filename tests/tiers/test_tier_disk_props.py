"""Property test: any sequence of stores, loads, removes, damage and restarts on a small disk tier
keeps it within budget, consistent with its slab files, and never returns a wrong page."""

from __future__ import annotations

import shutil
import tempfile
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tierkit import Pages, run, slot_bytes, slot_file

from kvtier.tiers.disk import DiskTier
from kvtier.tiers.registry import make_tier

BUDGET_PAGES = 4
KEYS = [Pages.key(i) for i in range(8)]
PAGES = Pages(num_slots=24, payload_bytes=4096, fingerprint=b"P" * 16)

key_sets = st.lists(st.sampled_from(KEYS), min_size=1, max_size=6, unique=True)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("store"), key_sets),
        st.tuples(st.just("load"), key_sets),
        st.tuples(st.just("remove"), key_sets),
        st.tuples(st.just("damage"), st.sampled_from(KEYS)),
        st.tuples(st.just("restart"), st.just([])),
    ),
    max_size=25,
)


def open_tier(path: str) -> DiskTier:
    budget = BUDGET_PAGES * slot_bytes(PAGES)
    tier = make_tier("disk", "disk", {"path": path, "budget": budget, "threads": 1}, PAGES.ctx)
    assert isinstance(tier, DiskTier)
    return tier


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_disk_tier_model(sequence: list[tuple[str, Any]]) -> None:
    path = tempfile.mkdtemp(prefix="kvtier-disk-prop-")
    tier = open_tier(path)
    stored: set[bytes] = set()  # keys the tier may hold (eviction can only shrink this)
    try:
        for op, arg in sequence:
            if op == "store":
                keys = list(arg)
                res = run(tier, "store", PAGES.items(keys))
                stored |= set(res.ok)
            elif op == "load":
                keys = list(arg)
                res = run(tier, "load", PAGES.empty(keys, first_slot=8))
                assert set(res.ok) <= stored, "loaded a page that was never stored"
                for i, key in enumerate(keys):
                    if key in res.ok:
                        assert PAGES.holds(key, 8 + i), "wrong bytes for a loaded page"
                stored -= set(res.failed)
            elif op == "remove":
                tier.remove(list(arg))
                stored -= set(arg)
                assert not any(tier.contains(list(arg)))
            elif op == "damage":
                key = arg
                assert isinstance(key, bytes)
                if tier.contains([key])[0]:  # flip the last byte of its page in place
                    slab, off = slot_file(tier, key)
                    with open(slab, "r+b") as f:
                        f.seek(off + PAGES.blob_bytes() - 1)
                        byte = f.read(1)[0]
                        f.seek(off + PAGES.blob_bytes() - 1)
                        f.write(bytes([byte ^ 0x01]))
            else:
                tier.close()
                tier = open_tier(path)
            held = {k for k, here in zip(KEYS, tier.contains(KEYS)) if here}
            assert held <= stored
            assert len(held) <= BUDGET_PAGES
            assert tier.stats().used_bytes == len(held) * PAGES.blob_bytes()
            tier.check_integrity()
    finally:
        tier.close()
        shutil.rmtree(path, ignore_errors=True)
