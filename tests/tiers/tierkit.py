"""Pages in a real host pool for tier tests: sealed blobs with random payloads, and checks."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from kvtier.keys import HEADER_SIZE, write_header
from kvtier.memory.host_pool import HostPool
from kvtier.tiers.base import Item, JobResult, SecondaryTier, ThreadedTier, TierContext


class Pages:
    """`n` slots of `payload_bytes`; `seal(key, slot)` fills a slot with a page unique to key."""

    def __init__(self, num_slots: int = 32, payload_bytes: int = 16 << 10,
                 fingerprint: bytes | None = None) -> None:
        self.pool = HostPool(num_slots, payload_bytes, pin=False)
        self.ctx = TierContext(fingerprint or os.urandom(16), payload_bytes)

    @staticmethod
    def key(i: int) -> bytes:
        return i.to_bytes(4, "little") + b"kvtier-test!"

    def payload_for(self, key: bytes) -> torch.Tensor:
        g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little"))
        return torch.randint(0, 256, (self.ctx.payload_bytes,), dtype=torch.uint8, generator=g)

    def seal(self, key: bytes, slot: int) -> Item:
        self.pool.payload(slot).copy_(self.payload_for(key))
        buf = self.pool.blob(slot)
        write_header(buf, self.ctx.fingerprint, key, self.ctx.payload_bytes, seal=True)
        return key, buf

    def items(self, keys: Sequence[bytes], first_slot: int = 0) -> list[Item]:
        return [self.seal(k, first_slot + i) for i, k in enumerate(keys)]

    def empty(self, keys: Sequence[bytes], first_slot: int = 0) -> list[Item]:
        """Slots scrubbed to 0xEE so a load that wrote nothing can never look right."""
        out = []
        for i, k in enumerate(keys):
            self.pool.slot(first_slot + i).fill_(0xEE)
            out.append((k, self.pool.blob(first_slot + i)))
        return out

    def holds(self, key: bytes, slot: int) -> bool:
        """Bit-exact: slot `slot` holds the page of `key` (payload and header)."""
        return bool(torch.equal(self.pool.payload(slot), self.payload_for(key))) and bytes(
            self.pool.blob(slot)[24:40]
        ) == key

    def blob_bytes(self) -> int:
        return HEADER_SIZE + self.ctx.payload_bytes


def run(tier: SecondaryTier, op: str, items: Sequence[Item], timeout: float = 30.0) -> JobResult:
    """Submit one job and wait for its result (ThreadedTier tiers)."""
    assert isinstance(tier, ThreadedTier)
    submit = tier.submit_store if op == "store" else tier.submit_load
    job = submit(items)
    assert job is not None, "tier refused the batch"
    for result in tier.wait_all(timeout):
        if result.job_id == job:
            return result
    raise AssertionError(f"job {job} never finished")


def slot_bytes(pages: Pages) -> int:
    """A slab tier's slot stride for these pages (blob rounded up to 4 KiB)."""
    return -(-pages.blob_bytes() // 4096) * 4096


def slot_file(tier: object, key: bytes) -> tuple[str, int]:
    """(slab path, byte offset) of a page stored in a slab tier (disk, or nixl on files)."""
    slabs = getattr(tier, "slabs", None) or getattr(tier, "store").slabs  # noqa: B009
    slab, idx = divmod(tier._slot[key], slabs.per_slab)  # type: ignore[attr-defined]
    return slabs.slab_path(slab), idx * slabs.slot_bytes
