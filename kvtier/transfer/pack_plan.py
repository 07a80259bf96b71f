"""How a request's blocks are packed into staging slots for a packed NIXL transfer.

A packed transfer gathers a request's scattered blocks into a contiguous staging slot on the
sender, moves the slot with one NIXL descriptor, and scatters it into the receiver's blocks.
Both sides must cut the request into the same chunks from their own block ids, so the plan is a
pure function of the KV cache spec, the per-group block count and the slot size.

Packed order: groups ascending; per group its tensors in spec order; per tensor its planes (one,
or K then V for a kv_split tensor); per plane the request's blocks in the order given. Each plane
is a table of `spec.num_blocks` rows of `row_bytes` (the layout kvtier.transfer.registration
describes), so a piece of a chunk is "rows ids[lo:hi] of plane p", one index_select / index_copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from kvtier.errors import ConfigError
from kvtier.geometry.groups import KVCacheSpec


class Plane(NamedTuple):
    """Rows of one tensor (or one half of a kv_split tensor) as a group addresses them."""

    group: int
    tensor: str
    offset: int  # byte offset of row 0 inside the tensor
    row_bytes: int


class Piece(NamedTuple):
    """Rows ids[lo:hi] of `plane` (ids = the request's block ids of the plane's group) at
    byte `at` of the slot."""

    plane: int
    lo: int
    hi: int
    at: int


def planes(spec: KVCacheSpec, groups: Mapping[int, int]) -> list[Plane]:
    """The planes a request touches, in packed order; `groups` maps group -> block count."""
    out: list[Plane] = []
    for g in sorted(groups):
        if groups[g] <= 0:
            continue
        block = spec.block_bytes(g)
        for t in spec.tensors_of_group(g):
            if t.kv_split:
                half = block // 2
                out += [Plane(g, t.name, 0, half), Plane(g, t.name, spec.num_blocks * half, half)]
            else:
                out.append(Plane(g, t.name, 0, block))
    return out


def _budget(index: int, done: int, total: int, slot_bytes: int, first: int) -> int:
    """Bytes chunk `index` may take when `done` of `total` bytes are planned. With a ramp
    (0 < first < slot_bytes) chunks grow from `first` by doubling and shrink by halving over
    the last bytes, so the first gather and the last scatter, which no transfer hides, are
    short; without one every chunk is a full slot."""
    if not 0 < first < slot_bytes:
        return slot_bytes
    left = total - done
    if left <= 2 * first:
        return min(slot_bytes, left)
    return min(slot_bytes, first << min(index, 62), max(first, left // 2))


def chunk_plan(spec: KVCacheSpec, groups: Mapping[int, int], slot_bytes: int,
               first: int = 0) -> tuple[list[Plane], list[list[Piece]]]:
    """(planes, chunks): every plane's rows cut into chunks of at most `slot_bytes` bytes,
    whole rows only, ramped from `first` bytes when 0 < first < slot_bytes (see _budget).
    Raises ConfigError when one row does not fit a slot."""
    ps = planes(spec, groups)
    total = sum(groups[p.group] * p.row_bytes for p in ps)
    chunks: list[list[Piece]] = []
    cur: list[Piece] = []
    used = done = 0
    cap = _budget(0, 0, total, slot_bytes, first)
    for i, p in enumerate(ps):
        if p.row_bytes > slot_bytes:
            raise ConfigError("staging slot_bytes", slot_bytes, f">= one block row ({p.row_bytes})")
        n, lo = groups[p.group], 0
        while lo < n:
            fit = (max(cap, p.row_bytes if not cur else 0) - used) // p.row_bytes
            if fit <= 0:
                chunks.append(cur)
                done += used
                cur, used = [], 0
                cap = _budget(len(chunks), done, total, slot_bytes, first)
                continue
            hi = min(n, lo + fit)
            cur.append(Piece(i, lo, hi, used))
            used += (hi - lo) * p.row_bytes
            lo = hi
    if cur:
        chunks.append(cur)
    return ps, chunks


def chunk_bytes(ps: list[Plane], chunk: list[Piece]) -> int:
    return sum((c.hi - c.lo) * ps[c.plane].row_bytes for c in chunk)
