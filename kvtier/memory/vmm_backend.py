"""The device primitives an elastic pool needs: virtual address space and physical pages.

`DeviceBackend` is the narrow waist between the allocator logic (`kvtier.memory.elastic`) and
a real driver (`vmm_cuda.CudaVmmBackend`) or the simulated one used on CPU (`vmm_sim.SimBackend`).
Every size and address is in bytes and must be a multiple of `granularity()`.

Zero fill: the pool keeps every unbacked range mapped to a per-device *zero page* (one physical
page that is never written, mapped read-only) so that a stray read of an unallocated block returns
zeros instead of faulting. Backends provide that page through `zero_page(device)`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import NamedTuple

from kvtier.errors import KVTierError

# The CUDA VMM granularity on every current NVIDIA GPU; used as the default page size.
PAGE_BYTES = 2 * 1024 * 1024


class DriverError(KVTierError):
    """A device driver call failed for a reason other than running out of memory.

    `call` names the primitive (e.g. "cuMemMap") and `code` the driver's result code.
    """

    def __init__(self, call: str, code: object, detail: str = "") -> None:
        self.call = call
        self.code = code
        super().__init__(f"{call} failed: {code}{' (' + detail + ')' if detail else ''}")


class MemInfo(NamedTuple):
    free: int
    total: int


class DeviceBackend(ABC):
    """Virtual address reservation plus physical pages on explicit devices.

    Contract for every implementation:
    - Methods mutate only the backend's own state (reservations, handles, mappings) and the
      driver's; they never touch allocator bookkeeping.
    - Out of physical memory raises `kvtier.errors.CapacityError`; any other driver failure raises
      `DriverError`. A failed call leaves the backend as it was before the call (no half-created
      handle, no half-mapped range). Nothing aborts the process.
    - Calls are not thread-safe; the owning pool serialises them.
    """

    @abstractmethod
    def device_count(self) -> int:
        """Number of devices pages can be created on (ordinals 0..n-1)."""

    @abstractmethod
    def granularity(self, device: int) -> int:
        """Smallest page size (bytes) for `create`/`map` on `device`."""

    @abstractmethod
    def can_access_peer(self, reader: int, owner: int) -> bool:
        """True if kernels on `reader` can read/write pages created on `owner`."""

    @abstractmethod
    def mem_info(self, device: int) -> MemInfo:
        """Free and total physical bytes on `device`."""

    @abstractmethod
    def reserve(self, nbytes: int) -> int:
        """Reserve `nbytes` of virtual address space (no physical memory); return its base."""

    @abstractmethod
    def free_reserve(self, va: int, nbytes: int) -> None:
        """Return a reservation made by `reserve`. Every mapping inside must be unmapped first."""

    @abstractmethod
    def create(self, device: int, nbytes: int) -> int:
        """Create `nbytes` of physical memory on `device`; return an opaque handle.

        Raises CapacityError when the device has no room.
        """

    @abstractmethod
    def release(self, handle: int) -> None:
        """Release a handle from `create`. Memory returns to the driver once no mapping uses it."""

    @abstractmethod
    def map(self, va: int, nbytes: int, handle: int) -> None:
        """Map the first `nbytes` of `handle` at `va` (which must be unmapped). No access yet."""

    @abstractmethod
    def set_access(
        self, va: int, nbytes: int, devices: Sequence[int], read_only: bool = False
    ) -> None:
        """Grant `devices` read (and, unless `read_only`, write) access to a mapped range."""

    @abstractmethod
    def unmap(self, va: int, nbytes: int) -> None:
        """Unmap exactly one range previously given to `map`."""

    @abstractmethod
    def zero_page(self, device: int) -> int:
        """A handle of one `granularity(device)` page of zeros on `device`, created on first use
        and owned by the backend (never released by callers, never written)."""

    @abstractmethod
    def mapping(self, va: int) -> int | None:
        """The handle mapped at `va` (a page start), or None. Used by integrity checks."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release backend-owned resources (zero pages). Safe to call twice."""
