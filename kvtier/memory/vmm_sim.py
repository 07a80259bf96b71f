"""A simulated `DeviceBackend` for CPU: N fake GPUs with byte capacities and real page contents.

Each physical handle owns a numpy buffer (allocated lazily, zero-filled), so tests can write
through virtual addresses and check where the bytes really live. Reads or writes of unmapped
ranges, or without access for the reading device, raise DriverError like a GPU fault would.
Failures can be injected per primitive (`inject`) so every error path of the pool runs in CI.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from kvtier.errors import CapacityError, ConfigError
from kvtier.memory.vmm_backend import PAGE_BYTES, DeviceBackend, DriverError, MemInfo

_VA_BASE = 0x7F00_0000_0000


@dataclass
class _Handle:
    device: int
    nbytes: int
    buf: np.ndarray | None = None  # allocated on first write; None reads as zeros
    released: bool = False
    maps: int = 0


@dataclass
class _Granule:
    handle: int
    offset: int  # byte offset inside the handle
    range_va: int  # start of the map() call this granule belongs to
    range_bytes: int
    readers: set[int] = field(default_factory=set)
    read_only: bool = True


class SimBackend(DeviceBackend):
    """Simulated devices. `capacities[i]` is the byte capacity of device i."""

    def __init__(
        self,
        capacities: Sequence[int],
        granularity: int = PAGE_BYTES,
        peer_links: set[tuple[int, int]] | None = None,
    ) -> None:
        if not capacities:
            raise ConfigError("capacities", capacities, "at least one device")
        if granularity <= 0 or granularity & (granularity - 1):
            raise ConfigError("granularity", granularity, "a positive power of two")
        self._cap = list(capacities)
        self._gran = granularity
        n = len(capacities)
        self._peers = (
            peer_links
            if peer_links is not None
            else {(a, b) for a in range(n) for b in range(n) if a != b}
        )
        self._used = [0] * n
        self._handles: dict[int, _Handle] = {}
        self._next_handle = 1
        self._next_va = _VA_BASE
        self._reserved: dict[int, int] = {}
        self._granules: dict[int, _Granule] = {}
        self._zero: dict[int, int] = {}
        self._faults: dict[str, list[tuple[int, str]]] = {}
        self.calls: dict[str, int] = {}

    # -- failure injection --------------------------------------------------------------------
    def inject(self, call: str, after: int = 0, kind: str = "driver") -> None:
        """Make the (after+1)-th next call of `call` fail with CapacityError ("oom") or
        DriverError ("driver"). Several injections for one call queue up."""
        self._faults.setdefault(call, []).append((after, kind))

    def _maybe_fail(self, call: str) -> None:
        self.calls[call] = self.calls.get(call, 0) + 1
        queue = self._faults.get(call)
        if not queue:
            return
        after, kind = queue[0]
        if after > 0:
            queue[0] = (after - 1, kind)
            return
        queue.pop(0)
        if kind == "oom":
            raise CapacityError(f"{call}: injected out of memory")
        raise DriverError(call, "CUDA_ERROR_INJECTED")

    # -- DeviceBackend ------------------------------------------------------------------------
    def device_count(self) -> int:
        return len(self._cap)

    def granularity(self, device: int) -> int:
        self._check_device(device)
        return self._gran

    def can_access_peer(self, reader: int, owner: int) -> bool:
        return reader == owner or (reader, owner) in self._peers

    def mem_info(self, device: int) -> MemInfo:
        self._check_device(device)
        return MemInfo(self._cap[device] - self._used[device], self._cap[device])

    def reserve(self, nbytes: int) -> int:
        self._check_size(nbytes)
        self._maybe_fail("reserve")
        va = self._next_va
        self._next_va += nbytes + self._gran  # a guard gap between reservations
        self._reserved[va] = nbytes
        return va

    def free_reserve(self, va: int, nbytes: int) -> None:
        if self._reserved.get(va) != nbytes:
            raise DriverError("free_reserve", "CUDA_ERROR_INVALID_VALUE", f"va={va:#x}")
        if any(va <= g < va + nbytes for g in self._granules):
            raise DriverError("free_reserve", "CUDA_ERROR_INVALID_VALUE", "range still mapped")
        del self._reserved[va]

    def create(self, device: int, nbytes: int) -> int:
        self._check_device(device)
        self._check_size(nbytes)
        self._maybe_fail("create")
        if self._used[device] + nbytes > self._cap[device]:
            raise CapacityError(f"device {device}: {nbytes} bytes do not fit")
        self._used[device] += nbytes
        handle = self._next_handle
        self._next_handle += 1
        self._handles[handle] = _Handle(device, nbytes)
        return handle

    def release(self, handle: int) -> None:
        h = self._handles.get(handle)
        if h is None or h.released:
            raise DriverError("release", "CUDA_ERROR_INVALID_VALUE", f"handle {handle}")
        self._maybe_fail("release")
        h.released = True
        self._drop_if_dead(handle)

    def map(self, va: int, nbytes: int, handle: int) -> None:
        self._check_size(nbytes)
        h = self._handles.get(handle)
        if h is None or h.released or nbytes > h.nbytes:
            raise DriverError("map", "CUDA_ERROR_INVALID_VALUE", f"handle {handle}")
        if not self._inside_reservation(va, nbytes):
            raise DriverError("map", "CUDA_ERROR_INVALID_VALUE", f"va={va:#x} not reserved")
        starts = range(va, va + nbytes, self._gran)
        if any(g in self._granules for g in starts):
            raise DriverError("map", "CUDA_ERROR_ALREADY_MAPPED", f"va={va:#x}")
        self._maybe_fail("map")
        for i, g in enumerate(starts):
            self._granules[g] = _Granule(handle, i * self._gran, va, nbytes)
        h.maps += 1

    def set_access(
        self, va: int, nbytes: int, devices: Sequence[int], read_only: bool = False
    ) -> None:
        starts = range(va, va + nbytes, self._gran)
        if any(g not in self._granules for g in starts):
            raise DriverError("set_access", "CUDA_ERROR_INVALID_VALUE", f"va={va:#x} unmapped")
        for d in devices:
            owner = self._handles[self._granules[va].handle].device
            if not self.can_access_peer(d, owner):
                raise DriverError("set_access", "CUDA_ERROR_INVALID_DEVICE", f"{d} -> {owner}")
        self._maybe_fail("set_access")
        for g in starts:
            gr = self._granules[g]
            gr.readers = set(devices)
            gr.read_only = read_only

    def unmap(self, va: int, nbytes: int) -> None:
        first = self._granules.get(va)
        if first is None or first.range_va != va or first.range_bytes != nbytes:
            raise DriverError("unmap", "CUDA_ERROR_INVALID_VALUE", f"va={va:#x} not a mapping")
        self._maybe_fail("unmap")
        for g in range(va, va + nbytes, self._gran):
            del self._granules[g]
        self._handles[first.handle].maps -= 1
        self._drop_if_dead(first.handle)

    def zero_page(self, device: int) -> int:
        if device not in self._zero:
            self._zero[device] = self.create(device, self._gran)
        return self._zero[device]

    def mapping(self, va: int) -> int | None:
        g = self._granules.get(va)
        return None if g is None else g.handle

    def close(self) -> None:
        for handle in self._zero.values():
            self._handles[handle].released = True
            self._drop_if_dead(handle)
        self._zero.clear()

    # -- data access (what a kernel on `device` would see) ------------------------------------
    def read(self, va: int, nbytes: int, device: int) -> bytes:
        out = bytearray()
        for g, lo, hi in self._pieces(va, nbytes, device, write=False):
            h = self._handles[g.handle]
            if h.buf is None:
                out += bytes(hi - lo)
            else:
                out += h.buf[g.offset + lo : g.offset + hi].tobytes()
        return bytes(out)

    def write(self, va: int, data: bytes, device: int) -> None:
        pos = 0
        for g, lo, hi in self._pieces(va, len(data), device, write=True):
            h = self._handles[g.handle]
            if h.buf is None:
                h.buf = np.zeros(h.nbytes, dtype=np.uint8)
            chunk = np.frombuffer(data[pos : pos + hi - lo], np.uint8)
            h.buf[g.offset + lo : g.offset + hi] = chunk
            pos += hi - lo

    def handle_bytes(self, handle: int) -> bytes:
        """The physical contents of a live handle (to prove the zero page stays zero)."""
        h = self._handles[handle]
        return bytes(h.nbytes) if h.buf is None else h.buf.tobytes()

    def handle_device(self, handle: int) -> int:
        return self._handles[handle].device

    def used(self, device: int) -> int:
        return self._used[device]

    def live_handles(self) -> int:
        return len(self._handles)

    # -- helpers ------------------------------------------------------------------------------
    def _pieces(
        self, va: int, nbytes: int, device: int, write: bool
    ) -> list[tuple[_Granule, int, int]]:
        pieces = []
        end = va + nbytes
        while va < end:
            base = va - va % self._gran
            g = self._granules.get(base)
            if g is None:
                raise DriverError("access", "CUDA_ERROR_ILLEGAL_ADDRESS", f"va={va:#x} unmapped")
            if device not in g.readers or (write and g.read_only):
                raise DriverError("access", "CUDA_ERROR_ILLEGAL_ADDRESS", f"va={va:#x} no access")
            lo = va - base
            hi = min(self._gran, end - base)
            pieces.append((g, lo, hi))
            va = base + hi
        return pieces

    def _drop_if_dead(self, handle: int) -> None:
        h = self._handles[handle]
        if h.released and h.maps == 0:
            self._used[h.device] -= h.nbytes
            del self._handles[handle]

    def _inside_reservation(self, va: int, nbytes: int) -> bool:
        return any(b <= va and va + nbytes <= b + n for b, n in self._reserved.items())

    def _check_device(self, device: int) -> None:
        if not 0 <= device < len(self._cap):
            raise DriverError("device", "CUDA_ERROR_INVALID_DEVICE", f"ordinal {device}")

    def _check_size(self, nbytes: int) -> None:
        if nbytes <= 0 or nbytes % self._gran:
            raise DriverError("size", "CUDA_ERROR_INVALID_VALUE", f"{nbytes} bytes")
