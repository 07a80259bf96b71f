"""The primary host tier: the only tier the copy engine touches.

It maps page keys to host-pool slots and tracks, per page, a state and a reference count:

    WRITING    slot handed to a writer (engine store or promotion); invisible to lookups
    READY      readable; in the eviction policy; evictable only while refs == 0
    DEMOTING   evicted from the policy, slot still held while a lower tier copies it out

Every reader or writer in flight holds one reference (a lease) on the page; the policy is told
to pin a READY page while its count is above zero, so eviction never picks a page in use. The
tier is not thread-safe by itself: the cache serialises calls under its lock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from enum import IntEnum

from kvtier.keys import PageKey
from kvtier.memory.host_pool import HostPool
from kvtier.policy import EvictionPolicy


class PageState(IntEnum):
    WRITING = 0
    READY = 1
    DEMOTING = 2


class Page:
    __slots__ = ("refs", "sealed", "slot", "state")

    def __init__(self, slot: int, state: PageState, refs: int) -> None:
        self.slot = slot
        self.state = state
        self.refs = refs
        self.sealed = False  # header checksum written (done once, before the page goes down)


class HostTier:
    name = "host"

    def __init__(self, pool: HostPool, policy: EvictionPolicy[PageKey]) -> None:
        self.pool = pool
        self.policy = policy
        self.pages: dict[PageKey, Page] = {}

    # -- queries ---------------------------------------------------------------------------
    def ready_prefix(self, keys: Sequence[PageKey]) -> int:
        """Number of leading keys that are READY (the hot path of every lookup)."""
        pages = self.pages
        n = 0
        for key in keys:
            page = pages.get(key)
            if page is None or page.state != PageState.READY:
                break
            n += 1
        return n

    def state(self, key: PageKey) -> PageState | None:
        page = self.pages.get(key)
        return None if page is None else page.state

    def slot(self, key: PageKey) -> int:
        return self.pages[key].slot

    def __len__(self) -> int:
        return len(self.pages)

    def __contains__(self, key: object) -> bool:
        return key in self.pages

    # -- reference counts --------------------------------------------------------------------
    def acquire(self, key: PageKey) -> int:
        """Take a lease on a READY page; return its slot. KeyError if not READY."""
        page = self.pages.get(key)
        if page is None or page.state != PageState.READY:
            raise KeyError(key)
        page.refs += 1
        if page.refs == 1:
            self.policy.pin(key)
        return page.slot

    def acquire_any(self, key: PageKey) -> int:
        """Take a lease on a READY or DEMOTING page (a lower-tier copy reading it)."""
        page = self.pages[key]
        if page.state == PageState.WRITING:
            raise KeyError(key)
        page.refs += 1
        if page.refs == 1 and page.state == PageState.READY:
            self.policy.pin(key)
        return page.slot

    def release(self, key: PageKey) -> None:
        """Drop a lease. A DEMOTING page whose last lease goes is freed here."""
        page = self.pages[key]
        if page.refs <= 0:
            raise RuntimeError(f"lease released twice for page {key.hex()}")
        page.refs -= 1
        if page.refs == 0:
            if page.state == PageState.READY:
                self.policy.unpin(key)
            elif page.state == PageState.DEMOTING:
                self._drop(key)

    # -- allocation --------------------------------------------------------------------------
    def make_room(self, n: int) -> list[PageKey]:
        """Choose victims so that n slots can be reserved; return them (still holding slots).

        Returns [] when enough slots are free. Raises EvictionError (nothing changed) when too
        few pages are evictable. The caller frees or demotes each victim (drop / start_demote).
        """
        short = n - self.pool.num_free
        if short <= 0:
            return []
        return self.policy.evict(short)

    def reserve(self, keys: Sequence[PageKey]) -> list[int] | None:
        """Allocate slots for `keys` in state WRITING with one lease each (the writer's).

        All or nothing: None if the pool lacks free slots (call make_room first)."""
        slots = self.pool.alloc(len(keys))
        if slots is None:
            return None
        for key, slot in zip(keys, slots):
            self.pages[key] = Page(slot, PageState.WRITING, 1)
        return slots

    def publish(self, key: PageKey) -> None:
        """WRITING -> READY: visible to lookups, in the policy; drops the writer's lease."""
        page = self.pages[key]
        if page.state != PageState.WRITING:
            raise RuntimeError(f"publish of page {key.hex()} in state {page.state.name}")
        page.state = PageState.READY
        page.refs -= 1
        self.policy.insert(key)
        if page.refs > 0:
            self.policy.pin(key)

    def abort(self, key: PageKey) -> None:
        """Give up a WRITING page: free its slot."""
        page = self.pages[key]
        if page.state != PageState.WRITING:
            raise RuntimeError(f"abort of page {key.hex()} in state {page.state.name}")
        page.refs -= 1
        if page.refs == 0:
            self._drop(key)

    def drop(self, key: PageKey) -> None:
        """Free an evicted (already out of the policy) unreferenced page."""
        if self.pages[key].refs:
            raise RuntimeError(f"drop of referenced page {key.hex()}")
        self._drop(key)

    def start_demote(self, key: PageKey) -> int:
        """An evicted page keeps its slot while a lower tier copies it; returns the slot.

        The copier holds one lease; when it is released the slot is freed."""
        page = self.pages[key]
        page.state = PageState.DEMOTING
        page.refs += 1
        return page.slot

    def remove(self, key: PageKey) -> bool:
        """Invalidate a READY, unreferenced page (explicit removal). False if it is in use."""
        page = self.pages.get(key)
        if page is None or page.state != PageState.READY or page.refs:
            return False
        self.policy.remove(key)
        self._drop(key)
        return True

    def _drop(self, key: PageKey) -> None:
        page = self.pages.pop(key)
        self.pool.free([page.slot])

    # -- integrity -------------------------------------------------------------------------
    def check_integrity(self, expected_refs: dict[PageKey, int] | None = None) -> None:
        """Slots unique and allocated, policy holds exactly the READY pages, and (when given)
        every page's count equals the leases the cache knows of."""
        self.pool.check_integrity()
        slots = [p.slot for p in self.pages.values()]
        assert len(set(slots)) == len(slots), "two pages share a slot"
        assert len(slots) + self.pool.num_free == self.pool.num_slots, "slot leaked or double-owned"
        ready = {k for k, p in self.pages.items() if p.state == PageState.READY}
        assert set(self.policy.keys()) == ready, "policy and READY pages disagree"
        pinned = sum(1 for k in ready if self.pages[k].refs)
        assert self.policy.evictable() == len(ready) - pinned, "policy pins disagree with refs"
        for key, page in self.pages.items():
            assert page.refs >= 0, f"negative refs on {key.hex()}"
            if page.state != PageState.READY:
                assert page.refs > 0, f"{page.state.name} page {key.hex()} has no owner"
        if expected_refs is not None:
            for key, page in self.pages.items():
                want = expected_refs.get(key, 0)
                assert page.refs == want, f"page {key.hex()}: {page.refs} refs, {want} leases"
        self.policy.check_integrity()

    def pages_in(self, states: Iterable[PageState]) -> int:
        wanted = set(states)
        return sum(1 for p in self.pages.values() if p.state in wanted)
