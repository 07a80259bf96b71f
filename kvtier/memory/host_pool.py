"""Host page pool: fixed-size page slots in one buffer.

Each slot holds one page blob: a HEADER_SIZE header followed by the page payload in the canonical
page-first layout, and is padded to a 4 KiB multiple so that every slot starts page-aligned
(direct I/O and DMA both like that). The buffer is pinned when CUDA is present (the copy engine
DMAs and GPU kernels write straight into it), plain otherwise, and can live in a shared-memory
file so that the processes of one engine (scheduler and workers) see the same slots.

The pool only hands out and takes back slot numbers; what a slot holds and who may touch it is the
business of the host tier above (reference counts) and the copy engine.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from pathlib import Path

import torch

from kvtier.errors import CapacityError, ConfigError
from kvtier.keys import HEADER_SIZE

SLOT_ALIGN = 4096


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


class HostPool:
    """`num_slots` slots of `payload_bytes` each (plus header), in one contiguous buffer.

    Thread-safe: alloc/free take an internal lock. alloc is all-or-nothing.
    """

    def __init__(
        self,
        num_slots: int,
        payload_bytes: int,
        *,
        pin: bool | None = None,
        shm_path: str | os.PathLike[str] | None = None,
        create: bool = True,
    ) -> None:
        if num_slots <= 0:
            raise ConfigError("host.num_slots", num_slots, "a positive integer (raise the budget)")
        if payload_bytes <= 0:
            raise ConfigError("payload_bytes", payload_bytes, "a positive integer")
        self.num_slots = num_slots
        self.payload_bytes = payload_bytes
        self.slot_bytes = _round_up(HEADER_SIZE + payload_bytes, SLOT_ALIGN)
        self.payload_offset = HEADER_SIZE
        total = self.slot_bytes * num_slots
        self._mmap: mmap.mmap | None = None
        self.shm_path = Path(shm_path) if shm_path is not None else None
        if self.shm_path is not None:
            flat = self._map_shared(self.shm_path, total, create)
        else:
            flat = torch.empty(total, dtype=torch.uint8)
        want_pin = torch.cuda.is_available() if pin is None else pin
        self.pinned = False
        if want_pin:
            flat = self._pin(flat)
        self.tensor = flat.view(num_slots, self.slot_bytes)
        self._lock = threading.Lock()
        # LIFO free list: recently freed slots are warm in cache and TLB.
        self._free: list[int] = list(range(num_slots - 1, -1, -1))
        self._is_free = bytearray(b"\x01" * num_slots)

    @classmethod
    def for_budget(cls, budget_bytes: int, payload_bytes: int, **kw: object) -> HostPool:
        slot = _round_up(HEADER_SIZE + payload_bytes, SLOT_ALIGN)
        if budget_bytes < slot:
            raise ConfigError("host.budget", budget_bytes, f"at least one page slot ({slot} bytes)")
        return cls(budget_bytes // slot, payload_bytes, **kw)  # type: ignore[arg-type]

    def _map_shared(self, path: Path, total: int, create: bool) -> torch.Tensor:
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, total)
            elif os.fstat(fd).st_size < total:
                raise ConfigError("host.shm_path", str(path), f"a pool file of >= {total} bytes")
            self._mmap = mmap.mmap(fd, total)
        finally:
            os.close(fd)
        return torch.frombuffer(self._mmap, dtype=torch.uint8)

    def _pin(self, flat: torch.Tensor) -> torch.Tensor:
        if self._mmap is None:
            self.pinned = True
            return flat.pin_memory()
        # Shared mappings are pinned in place so every process sees one buffer.
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(flat.data_ptr(), flat.numel(), 0)
        if int(err) != 0:
            raise CapacityError(f"cudaHostRegister of {flat.numel()} bytes failed: {err}")
        self.pinned = True
        return flat

    # -- slots -----------------------------------------------------------------------------
    def alloc(self, n: int) -> list[int] | None:
        """Take n free slots, or None (nothing taken) if fewer than n are free."""
        with self._lock:
            if n > len(self._free):
                return None
            # Reversed so a fresh pool hands out ascending, contiguous slots: longer copy runs.
            out = self._free[len(self._free) - n :][::-1]
            del self._free[len(self._free) - n :]
            for s in out:
                self._is_free[s] = 0
            return out

    def free(self, slots: list[int] | tuple[int, ...]) -> None:
        """Give slots back. Raises ValueError on a double free (a reference-count bug above)."""
        with self._lock:
            for s in slots:
                if self._is_free[s]:
                    raise ValueError(f"slot {s} freed twice")
                self._is_free[s] = 1
                self._free.append(s)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity_bytes(self) -> int:
        return self.num_slots * self.slot_bytes

    # -- views -----------------------------------------------------------------------------
    def slot(self, s: int) -> torch.Tensor:
        """The whole slot (header + payload + padding), uint8."""
        return self.tensor[s]

    def payload(self, s: int) -> torch.Tensor:
        return self.tensor[s, HEADER_SIZE : HEADER_SIZE + self.payload_bytes]

    def payloads(self) -> torch.Tensor:
        """uint8 [num_slots, payload_bytes] strided view over every slot's payload."""
        return self.tensor[:, HEADER_SIZE : HEADER_SIZE + self.payload_bytes]

    def blob(self, s: int) -> memoryview:
        """Header + payload of slot s as a writable memoryview (what lower tiers store)."""
        t = self.tensor[s, : HEADER_SIZE + self.payload_bytes]
        return t.numpy().data.cast("B")

    def check_integrity(self) -> None:
        with self._lock:
            assert len(self._free) == sum(self._is_free), "free list and free map disagree"
            assert len(set(self._free)) == len(self._free), "slot on the free list twice"

    def close(self) -> None:
        if self._mmap is not None:
            if self.pinned:
                torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            del self.tensor
            # views may still be alive; the mapping then goes when they do
            with contextlib.suppress(BufferError):
                self._mmap.close()
            self._mmap = None
