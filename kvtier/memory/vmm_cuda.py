"""The real `DeviceBackend`: CUDA virtual memory management through `cuda-bindings`.

Pages are created with `cuMemCreate` on an explicit device ordinal (pinned device memory), mapped
with `cuMemMap` into a range from `cuMemAddressReserve`, and made accessible with
`cuMemSetAccess` for the reading GPU(s) only; a page on GPU1 read by GPU0 goes over NVLink.

Zero fill, in detail: the driver gives no "unmapped reads as zero" mode (an access to an
unmapped address faults and poisons the context), so each device gets one *zero page*: created
once, cleared with cuMemsetD8 through a temporary private mapping, then mapped (any number of
times) over every unbacked page of a pool with read-only access. The pool swaps a real page in
(unmap zero, map real, grant read/write) when it backs a slot, and swaps the zero page back when
it releases one. Kernels therefore never fault on an unallocated block, they read zeros; a kernel
that writes one faults (read-only), which exposes the bug instead of corrupting shared zeros.
Where the driver refuses read-only access the zero page is mapped read/write and
`zero_read_only` is False (a buggy write could then make unallocated blocks read non-zero).

Errors: CUDA_ERROR_OUT_OF_MEMORY raises CapacityError, everything else DriverError; nothing
aborts the process. All calls run with the device's primary context current.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from kvtier.errors import CapacityError, KVTierError
from kvtier.memory.vmm_backend import DeviceBackend, DriverError, MemInfo


def load_driver() -> Any:
    """The cuda-bindings driver module: `cuda.bindings.driver` (newer) or `cuda.cuda`."""
    try:
        from cuda.bindings import driver

        return driver
    except ImportError:
        pass
    try:
        return importlib.import_module("cuda.cuda")  # cuda-python < 12.6
    except ImportError as exc:
        raise KVTierError("CUDA VMM needs the cuda-bindings package (pip install "
                          "cuda-bindings)") from exc


class CudaVmmBackend(DeviceBackend):
    """CUDA VMM on every visible device. Not thread-safe (the pool serialises calls)."""

    def __init__(self, home: int = 0, driver: Any = None) -> None:
        self.home = home  # whose context runs address-space calls (any device would do)
        # `driver`: a module with the cuda-bindings driver API (default: the installed one)
        self.cu = cu = driver if driver is not None else load_driver()
        self._check(cu.cuInit(0), "cuInit")
        count = self._check(cu.cuDeviceGetCount(), "cuDeviceGetCount")
        self._count = int(count)
        self._devs = [self._check(cu.cuDeviceGet(i), "cuDeviceGet") for i in range(self._count)]
        self._ctx: dict[int, Any] = {}
        self._handles: dict[int, Any] = {}
        self._next = 1
        self._maps: dict[int, tuple[int, int]] = {}  # page va -> (handle id, range start)
        self._zero: dict[int, int] = {}
        self._gran: dict[int, int] = {}
        self.zero_read_only = True

    # -- driver plumbing ----------------------------------------------------------------------
    def _check(self, result: Any, call: str) -> Any:
        """Unpack a cuda-bindings result tuple; raise on an error code."""
        if not isinstance(result, tuple):
            result = (result,)
        err = result[0]
        if err != self.cu.CUresult.CUDA_SUCCESS:
            name = getattr(err, "name", str(err))
            if err == self.cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY:
                raise CapacityError(f"{call}: {name}")
            raise DriverError(call, name)
        if len(result) == 1:
            return None
        return result[1] if len(result) == 2 else result[1:]

    @contextmanager
    def _on(self, device: int | None = None) -> Iterator[None]:
        """Run with `device`'s primary context (the one torch uses) pushed, and restore the
        caller's context after: a page created on a peer must not change torch's device."""
        device = self.home if device is None else device
        self._device(device)
        ctx = self._ctx.get(device)
        if ctx is None:
            ctx = self._check(self.cu.cuDevicePrimaryCtxRetain(self._devs[device]),
                              "cuDevicePrimaryCtxRetain")
            self._ctx[device] = ctx
        self._check(self.cu.cuCtxPushCurrent(ctx), "cuCtxPushCurrent")
        try:
            yield
        finally:
            self.cu.cuCtxPopCurrent()

    def _device(self, device: int) -> None:
        if not 0 <= device < self._count:
            raise DriverError("device", "CUDA_ERROR_INVALID_DEVICE", f"ordinal {device}")

    def _prop(self, device: int) -> Any:
        cu = self.cu
        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = device
        return prop

    def _ptr(self, va: int) -> Any:
        return self.cu.CUdeviceptr(va)

    # -- DeviceBackend ------------------------------------------------------------------------
    def device_count(self) -> int:
        return self._count

    def granularity(self, device: int) -> int:
        if device not in self._gran:
            self._device(device)
            flag = self.cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
            g = self._check(self.cu.cuMemGetAllocationGranularity(self._prop(device), flag),
                            "cuMemGetAllocationGranularity")
            self._gran[device] = int(g)
        return self._gran[device]

    def can_access_peer(self, reader: int, owner: int) -> bool:
        self._device(reader)
        self._device(owner)
        if reader == owner:
            return True
        ok = self._check(self.cu.cuDeviceCanAccessPeer(self._devs[reader], self._devs[owner]),
                         "cuDeviceCanAccessPeer")
        return bool(ok)

    def mem_info(self, device: int) -> MemInfo:
        with self._on(device):
            free, total = self._check(self.cu.cuMemGetInfo(), "cuMemGetInfo")
        return MemInfo(int(free), int(total))

    def reserve(self, nbytes: int) -> int:
        align = max(self.granularity(d) for d in range(self._count))
        with self._on():
            ptr = self._check(self.cu.cuMemAddressReserve(nbytes, align, 0, 0),
                              "cuMemAddressReserve")
        return int(ptr)

    def free_reserve(self, va: int, nbytes: int) -> None:
        with self._on():
            self._check(self.cu.cuMemAddressFree(self._ptr(va), nbytes), "cuMemAddressFree")

    def create(self, device: int, nbytes: int) -> int:
        with self._on(device):
            handle = self._check(self.cu.cuMemCreate(nbytes, self._prop(device), 0),
                                 "cuMemCreate")
        hid = self._next
        self._next += 1
        self._handles[hid] = handle
        return hid

    def release(self, handle: int) -> None:
        h = self._handles.get(handle)
        if h is None:
            raise DriverError("cuMemRelease", "CUDA_ERROR_INVALID_VALUE", f"handle {handle}")
        with self._on():
            self._check(self.cu.cuMemRelease(h), "cuMemRelease")
        del self._handles[handle]

    def map(self, va: int, nbytes: int, handle: int) -> None:
        h = self._handles.get(handle)
        if h is None:
            raise DriverError("cuMemMap", "CUDA_ERROR_INVALID_VALUE", f"handle {handle}")
        with self._on():
            self._check(self.cu.cuMemMap(self._ptr(va), nbytes, 0, h, 0), "cuMemMap")
        gran = self.granularity(0)
        for page in range(va, va + nbytes, gran):
            self._maps[page] = (handle, va)

    def set_access(
        self, va: int, nbytes: int, devices: Sequence[int], read_only: bool = False
    ) -> None:
        cu = self.cu
        flags = cu.CUmemAccess_flags
        read_only = read_only and self.zero_read_only  # once refused, do not ask again
        descs = []
        for d in devices:
            self._device(d)
            desc = cu.CUmemAccessDesc()
            desc.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
            desc.location.id = d
            desc.flags = (flags.CU_MEM_ACCESS_FLAGS_PROT_READ if read_only
                          else flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
            descs.append(desc)
        try:
            with self._on():
                self._check(cu.cuMemSetAccess(self._ptr(va), nbytes, descs, len(descs)),
                            "cuMemSetAccess")
        except DriverError:
            if not read_only:
                raise
            # some drivers refuse read-only device mappings: fall back, and say so
            self.zero_read_only = False
            self.set_access(va, nbytes, devices, read_only=False)

    def unmap(self, va: int, nbytes: int) -> None:
        with self._on():
            self._check(self.cu.cuMemUnmap(self._ptr(va), nbytes), "cuMemUnmap")
        gran = self.granularity(0)
        for page in range(va, va + nbytes, gran):
            self._maps.pop(page, None)

    def zero_page(self, device: int) -> int:
        if device in self._zero:
            return self._zero[device]
        gran = self.granularity(device)
        hid = self.create(device, gran)
        va = self.reserve(gran)
        try:
            self.map(va, gran, hid)
            self.set_access(va, gran, [device])
            with self._on(device):
                self._check(self.cu.cuMemsetD8(self._ptr(va), 0, gran), "cuMemsetD8")
                self._check(self.cu.cuCtxSynchronize(), "cuCtxSynchronize")
            self.unmap(va, gran)
        except KVTierError:  # undo the temporary mapping, keep the process healthy
            if va in self._maps:
                self.unmap(va, gran)
            self.free_reserve(va, gran)
            self.release(hid)
            raise
        self.free_reserve(va, gran)
        self._zero[device] = hid
        return hid

    def mapping(self, va: int) -> int | None:
        entry = self._maps.get(va)
        return None if entry is None else entry[0]

    def close(self) -> None:
        for hid in list(self._zero.values()):
            self.release(hid)  # the memory returns once the last zero mapping is unmapped
        self._zero.clear()

    # -- torch views --------------------------------------------------------------------------
    def tensor(self, va: int, shape: Sequence[int], dtype: Any, device: int) -> Any:
        """A torch tensor viewing `va` on `device` (no copy, no ownership: the pool must outlive
        it). Uses cupy's UnownedMemory + DLPack when available (the device is then explicit),
        else `__cuda_array_interface__` (torch infers the device from the first page)."""
        import torch

        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = itemsize
        for n in shape:
            nbytes *= int(n)
        raw = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[itemsize]
        try:
            import cupy

            mem = cupy.cuda.UnownedMemory(va, nbytes, self, device_id=device)
            arr = cupy.ndarray((nbytes // itemsize,), dtype=f"<i{itemsize}" if itemsize > 1
                               else "u1", memptr=cupy.cuda.MemoryPointer(mem, 0))
            flat = torch.from_dlpack(arr)
        except Exception:  # no cupy, or a cupy built for another CUDA
            flat = torch.as_tensor(_ArrayInterface(va, nbytes // itemsize, itemsize),
                                   device=f"cuda:{device}")
        if flat.data_ptr() != va or flat.device != torch.device("cuda", device):
            # torch copied (it took the device from the first page, not from `device`): a copy
            # would silently detach every later write from the pool's pages
            raise KVTierError(f"tensor view of {va:#x} came back as a copy at "
                              f"{flat.data_ptr():#x} on {flat.device} (install cupy for "
                              f"explicit-device views)")
        return flat.view(raw).view(dtype).view(*shape)


class _ArrayInterface:
    """The minimal `__cuda_array_interface__` for a flat integer array at `va`."""

    def __init__(self, va: int, count: int, itemsize: int) -> None:
        typestr = "|u1" if itemsize == 1 else f"<i{itemsize}"
        self.__cuda_array_interface__ = {
            "shape": (count,), "typestr": typestr, "data": (va, False), "version": 3,
            "strides": None,
        }
