"""NIXL plumbing for the nixl tier: one agent, fixed page slots in files or objects, batch I/O.

A `SlotStore` owns `num_slots` fixed slots of `slot_bytes` each and moves bytes between host
memory and slots with one NIXL transfer request per batch:

- files (`FileSlots`, POSIX backend): slots are fixed offsets in a few large slab files, so the
  files are opened and registered with NIXL once and a batch is only descriptors
  (offset, length, fd). No per-page create/rename/unlink, no per-page registration.
- objects (`ObjectSlots`, OBJ backend, S3-compatible): slot s is the object
  `<prefix><namespace hex>/slot-<s>`, registered once as device id s.

Host memory must be registered as DRAM too. `HostRegistry` registers the whole host buffer that
contains a batch's slots once (found from the memoryview's owner, or given through
`register_host_buffer`), and registers a batch's exact ranges only for that batch otherwise.
The POSIX and OBJ backends pin nothing, so a DRAM registration here is bookkeeping only.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvtier.tiers.slabs import SlabDir, open_slab_files
from kvtier.tiers.slots import SlotIOError
from kvtier.transfer.nixl_transport import load_nixl

_names = itertools.count()
Local = tuple[int, int]  # (host address, bytes)
Remote = tuple[int, int, int]  # (slot, offset inside the slot, bytes)


class NixlIOError(SlotIOError):
    """A NIXL request failed, timed out, or could not be built."""


def buffer_address(buf: memoryview | bytes | bytearray) -> int:
    """The address of a buffer's first byte (read-only buffers too)."""
    view = memoryview(buf)
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data) if view.nbytes else 0


def owner_region(buf: memoryview) -> tuple[int, int] | None:
    """(base, nbytes) of the whole allocation a buffer is a view of, when its owner says so.

    Follows memoryview.obj and numpy's .base chain to a torch tensor (whose storage is the host
    pool's one buffer) or to a plain root buffer (bytearray, mmap); None when nothing is found.
    """
    obj: Any = buf.obj
    for _ in range(16):
        storage = getattr(obj, "untyped_storage", None)
        if callable(storage):  # a torch tensor: its storage is the whole pool buffer
            st = storage()
            return int(st.data_ptr()), int(st.nbytes())
        nxt = getattr(obj, "base", None)
        if nxt is None:
            break
        obj = nxt
    if type(obj).__name__ == "mmap":  # a shared-memory pool file mapped whole
        root = memoryview(obj)
        return buffer_address(root), root.nbytes
    return None  # bytes/bytearray and the like may be short-lived: registered per batch


class HostRegistry:
    """DRAM registrations of one agent: whole host buffers once, else per batch."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self._lock = threading.Lock()
        self._regions: list[tuple[int, int, Any]] = []  # (start, end, NIXL reg list)
        self.temporary = 0  # batches that needed their own registration (stats, tests)

    def register(self, ptr: int, nbytes: int) -> bool:
        """Register [ptr, ptr + nbytes) for good; False if it overlaps a region already held."""
        with self._lock:
            end = ptr + nbytes
            if any(s < end and ptr < e for s, e, _ in self._regions):
                return any(s <= ptr and end <= e for s, e, _ in self._regions)
            reg = self.agent.register_memory([(ptr, nbytes, 0, "")], "DRAM")
            self._regions.append((ptr, end, reg))
            return True

    def covered(self, ptr: int, nbytes: int) -> bool:
        with self._lock:
            return any(s <= ptr and ptr + nbytes <= e for s, e, _ in self._regions)

    def prepare(self, bufs: Sequence[memoryview], keep: bool = True) -> tuple[list[Local], Any]:
        """Addresses of `bufs`, registering what is not yet covered: the whole owning pool
        buffer for good when `keep` and it can be found, else the exact ranges for this batch.
        Returns (locals, temp): pass `temp` to `release` after the transfer."""
        locs = [(buffer_address(b), memoryview(b).nbytes) for b in bufs]
        missing = [i for i, (p, n) in enumerate(locs) if keep and not self.covered(p, n)]
        for i in missing:
            region = owner_region(memoryview(bufs[i]))
            if region is not None and region[0] <= locs[i][0] and \
                    locs[i][0] + locs[i][1] <= region[0] + region[1]:
                self.register(*region)
        todo = sorted({locs[i] for i in range(len(locs)) if not self.covered(*locs[i])})
        if not todo:
            return locs, None
        with self._lock:
            self.temporary += 1
        return locs, self.agent.register_memory([(p, n, 0, "") for p, n in todo], "DRAM")

    def release(self, temp: Any) -> None:
        if temp is not None:
            self.agent.deregister_memory(temp)

    def close(self) -> None:
        with self._lock:
            regions, self._regions = self._regions, []
        for _, _, reg in regions:
            self.agent.deregister_memory(reg)


class SlotStore:
    """Fixed slots behind one NIXL agent. Thread-safe (the agent runs in strict sync mode)."""

    mem_type = ""

    def __init__(self, backend: str, params: dict[str, str], num_slots: int, slot_bytes: int,
                 timeout: float) -> None:
        api = load_nixl()
        self.api = api
        conf = api.nixl_agent_config(
            backends=[], sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
        self.agent = api.nixl_agent(f"kvtier-tier-{os.getpid()}-{next(_names)}", conf)
        if backend not in self.agent.plugin_list:
            raise NixlIOError(f"NIXL has no {backend} plugin (it has {self.agent.plugin_list})")
        self.agent.create_backend(backend, params)
        self.backend = backend
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.timeout = timeout
        self.host = HostRegistry(self.agent)
        self._regs: list[Any] = []
        self.wedged = False  # a request outlived its timeout and could not be released

    def remote(self, slot: int, offset: int, nbytes: int) -> tuple[int, int, int]:
        """The NIXL descriptor (addr, len, dev id) of bytes inside one slot."""
        raise NotImplementedError

    def exists(self, slots: Sequence[int]) -> list[bool]:
        """Which slots hold anything at all (files: every slot; they read as zeros)."""
        return [True] * len(slots)

    def lost(self, slots: Sequence[int]) -> list[bool]:
        """After a read of each of `slots` alone failed: which hold no readable page for good
        (files: all of them - a registered slab range reads unless the file was cut short)."""
        return [True] * len(slots)

    def transfer(self, op: str, local: Sequence[Local], remote: Sequence[Remote]) -> None:
        """One NIXL request moving local[i] <-> remote[i]; "WRITE" stores, "READ" loads.

        Raises NixlIOError when the request fails or does not finish within the timeout; a
        request that cannot even be cancelled then marks the store wedged (all later calls
        fail at once, so a stuck backend never gets more host slots to write into).
        """
        if self.wedged:
            raise NixlIOError("NIXL backend wedged by an earlier request that never finished")
        if not local:
            return
        agent = self.agent
        try:
            src = agent.get_xfer_descs(np.array([(p, n, 0) for p, n in local], np.uint64),
                                       "DRAM")
            dst = agent.get_xfer_descs(
                np.array([self.remote(*r) for r in remote], np.uint64), self.mem_type)
            handle = agent.initialize_xfer(op, src, dst, agent.name)
        except Exception as exc:  # NIXL raises its own error types
            raise NixlIOError(f"{op} request refused: {exc}") from exc
        done = False
        try:
            state = agent.transfer(handle)
            deadline = time.monotonic() + self.timeout
            pause = 0.0
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise NixlIOError(f"{op} of {len(local)} slots timed out")
                time.sleep(pause)
                pause = min(pause * 2 or 2e-5, 1e-3)  # poll fast first: most batches are quick
                state = agent.check_xfer_state(handle)
            if state != "DONE":
                raise NixlIOError(f"{op} of {len(local)} slots failed ({state})")
            done = True
        except NixlIOError:
            raise
        except Exception as exc:
            raise NixlIOError(f"{op} of {len(local)} slots failed: {exc}") from exc
        finally:
            try:
                handle.release()
            except Exception:
                if not done:
                    self.wedged = True  # still running: its buffers may yet be touched

    def close(self) -> None:
        self.host.close()
        for reg in self._regs:
            self.agent.deregister_memory(reg)
        self._regs = []


class FileSlots(SlotStore):
    """Slots in the slab files of `slabs` (see kvtier.tiers.slabs), registered with NIXL once.
    Files are sparse: only written slots take disk space."""

    mem_type = "FILE"

    def __init__(self, slabs: SlabDir, params: dict[str, str], timeout: float) -> None:
        super().__init__("POSIX", params, slabs.num_slots, slabs.slot_bytes, timeout)
        self.slabs = slabs
        self.root = slabs.root
        self.per_slab = slabs.per_slab
        self.fds: list[int] = []
        try:
            self.fds = open_slab_files(slabs)
            self._regs.append(self.agent.register_memory(
                [(0, slabs.slab_bytes(i), fd, "") for i, fd in enumerate(self.fds)], "FILE"))
        except BaseException:
            self.close()
            raise

    def slab_path(self, i: int) -> str:
        return self.slabs.slab_path(i)

    def remote(self, slot: int, offset: int, nbytes: int) -> tuple[int, int, int]:
        slab, idx = divmod(slot, self.per_slab)
        return idx * self.slot_bytes + offset, nbytes, self.fds[slab]

    def close(self) -> None:
        super().close()
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class ObjectSlots(SlotStore):
    """Slots as objects `<prefix>slot-<i>` in an S3-compatible bucket (OBJ backend)."""

    mem_type = "OBJ"

    def __init__(self, prefix: str, num_slots: int, slot_bytes: int, params: dict[str, str],
                 timeout: float) -> None:
        super().__init__("OBJ", params, num_slots, slot_bytes, timeout)
        self.prefix = prefix
        try:
            self._regs.append(self.agent.register_memory(self._descs(range(num_slots)), "OBJ"))
        except BaseException:
            self.close()
            raise

    def _descs(self, slots: Sequence[int]) -> list[tuple[int, int, int, str]]:
        return [(0, self.slot_bytes, s, f"{self.prefix}slot-{s:08d}") for s in slots]

    def remote(self, slot: int, offset: int, nbytes: int) -> tuple[int, int, int]:
        return offset, nbytes, slot

    def exists(self, slots: Sequence[int]) -> list[bool]:
        """Which slot objects exist in the bucket (one query; writes are whole objects)."""
        if not slots:
            return []
        try:
            found = self.agent.query_memory(self._descs(slots), "OBJ", "OBJ")
        except Exception as exc:  # NIXL's own error types: the server did not answer
            raise NixlIOError(f"object query failed: {exc}") from exc
        return [info is not None for info in found]

    def lost(self, slots: Sequence[int]) -> list[bool]:
        """Objects that are gone are lost; when the server does not answer, none is (a network
        fault is a miss now, not a reason to forget pages)."""
        try:
            return [not e for e in self.exists(slots)]
        except NixlIOError:
            return [False] * len(slots)
