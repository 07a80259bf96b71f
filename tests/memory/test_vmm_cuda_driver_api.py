"""CudaVmmBackend's use of the cuda-bindings call conventions, on CPU.

No CUDA driver runs here, so this drives the backend through a stand-in module with the same
call shapes as `cuda.bindings.driver` (result tuples, CUresult codes, struct objects), whose
semantics come from the simulated backend. It proves the Python side (result unpacking, error
mapping, context push/pop balance, zero-page setup, read-only fallback); the real driver is
exercised by the gpu-marked tests on the device machine.
"""

from __future__ import annotations

import enum
from types import SimpleNamespace
from typing import Any

import pytest

from kvtier.errors import CapacityError
from kvtier.memory.elastic import ElasticPool
from kvtier.memory.elastic_layout import ElasticLayout, PoolLimits
from kvtier.memory.vmm_backend import DriverError
from kvtier.memory.vmm_cuda import CudaVmmBackend
from kvtier.memory.vmm_sim import SimBackend

G = 2 << 20


class CUresult(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_OUT_OF_MEMORY = 2


class CUdeviceptr(int):
    pass


def _struct(**fields: Any) -> Any:
    return SimpleNamespace(**fields)


class FakeDriver:
    """The subset of `cuda.bindings.driver` the backend calls, over a SimBackend."""

    CUresult = CUresult
    CUdeviceptr = CUdeviceptr
    CUmemAllocationType = SimpleNamespace(CU_MEM_ALLOCATION_TYPE_PINNED=1)
    CUmemLocationType = SimpleNamespace(CU_MEM_LOCATION_TYPE_DEVICE=1)
    CUmemAllocationGranularity_flags = SimpleNamespace(CU_MEM_ALLOC_GRANULARITY_MINIMUM=0)
    CUmemAccess_flags = SimpleNamespace(CU_MEM_ACCESS_FLAGS_PROT_READ=1,
                                        CU_MEM_ACCESS_FLAGS_PROT_READWRITE=3)

    def __init__(self, sim: SimBackend, refuse_read_only: bool = False) -> None:
        self.sim = sim
        self.refuse_read_only = refuse_read_only
        self.ctx_stack: list[int] = []
        self.memset: list[tuple[int, int]] = []

    @staticmethod
    def CUmemAllocationProp() -> Any:
        return _struct(type=0, location=_struct(type=0, id=-1))

    @staticmethod
    def CUmemAccessDesc() -> Any:
        return _struct(flags=0, location=_struct(type=0, id=-1))

    def _call(self, fn: Any, *args: Any) -> tuple[Any, ...]:
        if not self.ctx_stack:
            return (CUresult.CUDA_ERROR_INVALID_VALUE, None)  # no current context
        try:
            out = fn(*args)
        except CapacityError:
            return (CUresult.CUDA_ERROR_OUT_OF_MEMORY, None)
        except DriverError:
            return (CUresult.CUDA_ERROR_INVALID_VALUE, None)
        return (CUresult.CUDA_SUCCESS, out)

    def cuInit(self, flags: int) -> tuple[Any, ...]:
        return (CUresult.CUDA_SUCCESS,)

    def cuDeviceGetCount(self) -> tuple[Any, ...]:
        return (CUresult.CUDA_SUCCESS, self.sim.device_count())

    def cuDeviceGet(self, i: int) -> tuple[Any, ...]:
        return (CUresult.CUDA_SUCCESS, 100 + i)

    def cuDevicePrimaryCtxRetain(self, dev: int) -> tuple[Any, ...]:
        return (CUresult.CUDA_SUCCESS, 1000 + dev - 100)  # device handles are 100 + ordinal

    def cuCtxPushCurrent(self, ctx: int) -> tuple[Any, ...]:
        self.ctx_stack.append(ctx)
        return (CUresult.CUDA_SUCCESS,)

    def cuCtxPopCurrent(self) -> tuple[Any, ...]:
        return (CUresult.CUDA_SUCCESS, self.ctx_stack.pop())

    def cuMemGetAllocationGranularity(self, prop: Any, flag: int) -> tuple[Any, ...]:
        return (CUresult.CUDA_SUCCESS, self.sim.granularity(prop.location.id))

    def cuDeviceCanAccessPeer(self, a: int, b: int) -> tuple[Any, ...]:
        return (CUresult.CUDA_SUCCESS, int(self.sim.can_access_peer(a - 100, b - 100)))

    def cuMemGetInfo(self) -> tuple[Any, ...]:
        info = self.sim.mem_info(self.ctx_stack[-1] - 1000)
        return (CUresult.CUDA_SUCCESS, info.free, info.total)

    def cuMemAddressReserve(self, size: int, align: int, addr: int, flags: int) -> tuple[Any, ...]:
        err, va = self._call(self.sim.reserve, size)
        return (err, CUdeviceptr(va or 0))

    def cuMemAddressFree(self, ptr: CUdeviceptr, size: int) -> tuple[Any, ...]:
        return self._call(self.sim.free_reserve, int(ptr), size)[:1]

    def cuMemCreate(self, size: int, prop: Any, flags: int) -> tuple[Any, ...]:
        assert prop.location.type == 1 and prop.type == 1
        return self._call(self.sim.create, prop.location.id, size)

    def cuMemRelease(self, handle: int) -> tuple[Any, ...]:
        return self._call(self.sim.release, handle)[:1]

    def cuMemMap(self, ptr: CUdeviceptr, size: int, offset: int, handle: int,
                 flags: int) -> tuple[Any, ...]:
        return self._call(self.sim.map, int(ptr), size, handle)[:1]

    def cuMemSetAccess(self, ptr: CUdeviceptr, size: int, descs: list[Any],
                       count: int) -> tuple[Any, ...]:
        assert count == len(descs)
        read_only = all(d.flags == 1 for d in descs)
        if read_only and self.refuse_read_only:
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        devices = [d.location.id for d in descs]
        return self._call(self.sim.set_access, int(ptr), size, devices, read_only)[:1]

    def cuMemUnmap(self, ptr: CUdeviceptr, size: int) -> tuple[Any, ...]:
        return self._call(self.sim.unmap, int(ptr), size)[:1]

    def cuMemsetD8(self, ptr: CUdeviceptr, value: int, n: int) -> tuple[Any, ...]:
        self.memset.append((int(ptr), n))
        return self._call(self.sim.write, int(ptr), bytes([value]) * n,
                          self.ctx_stack[-1] - 1000)[:1]

    def cuCtxSynchronize(self) -> tuple[Any, ...]:
        return (CUresult.CUDA_SUCCESS,)


def make(caps: list[int], **kw: Any) -> tuple[SimBackend, FakeDriver, CudaVmmBackend]:
    sim = SimBackend(caps, granularity=G)
    drv = FakeDriver(sim, **kw)
    return sim, drv, CudaVmmBackend(driver=drv)


def test_pool_on_cuda_backend_places_zero_fills_and_releases() -> None:
    sim, drv, be = make([G + 4 * G, 8 * G])
    assert be.device_count() == 2 and be.granularity(1) == G and be.can_access_peer(0, 1)
    lay = ElasticLayout(regions=2, chunk_bytes=G // 4, num_blocks=40)
    pool = ElasticPool(be, lay, 0, PoolLimits(None, ((1, 8 * G),)), reserve_slots=1)
    assert len(drv.memset) == 1  # the zero page was cleared once, through a private mapping
    assert sim.read(pool.base, 64, device=0) == bytes(64)
    blocks = pool.alloc(16)
    assert [pool.device_of(b) for b in blocks[::4]] == [0, 0, 1, 1]
    pool.check_integrity()
    assert be.mem_info(1).free == 4 * G  # two 2-page slots on the peer
    pool.free(blocks)
    pool.shrink(0)
    pool.check_integrity()
    pool.close()
    be.close()
    assert drv.ctx_stack == [] and sim.live_handles() == 0
    assert sim.used(0) == sim.used(1) == 0


def test_error_codes_map_to_capacity_and_driver_errors() -> None:
    _, drv, be = make([2 * G])
    with pytest.raises(CapacityError):
        be.create(0, 4 * G)
    with pytest.raises(DriverError, match="cuMemMap"):
        be.map(0x1000, G, be.create(0, G))
    with pytest.raises(DriverError):
        be.create(5, G)
    assert drv.ctx_stack == []  # every push was popped, errors included


def test_read_only_refused_falls_back_to_read_write() -> None:
    sim, _, be = make([8 * G], refuse_read_only=True)
    lay = ElasticLayout(regions=1, chunk_bytes=G, num_blocks=4)
    pool = ElasticPool(be, lay, 0)
    assert be.zero_read_only is False
    assert sim.read(pool.base, 16, device=0) == bytes(16)
    pool.alloc(2)
    pool.check_integrity()
    pool.close()
