"""Batched DMA: many (dst, src, size) copies in one driver call on a stream.

`cuMemcpyBatchAsync` (CUDA >= 12.8 drivers) takes arrays of pointers and sizes and runs them on
the copy engines in stream order. It is called through ctypes on the driver library with the
address arrays passed as numpy buffers, so a batch of 30 000 items costs one call and no Python
per-item work (the cuda-bindings wrapper converts list elements one by one, which alone takes
milliseconds at that count). CUDA 13 drivers export the call without the `failIdx` argument as
`cuMemcpyBatchAsync_v2`; older ones as `cuMemcpyBatchAsync` with it. Where neither exists the
batch falls back to a loop of `cuMemcpyAsync` (same results, higher per-item cost).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

import numpy as np

_CU_MEMCPY_SRC_ACCESS_ORDER_STREAM = 1


class _MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _MemcpyAttributes(ctypes.Structure):
    _fields_ = [
        ("srcAccessOrder", ctypes.c_int),
        ("srcLocHint", _MemLocation),
        ("dstLocHint", _MemLocation),
        ("flags", ctypes.c_uint),
    ]


class DMAError(RuntimeError):
    """A driver call failed; the message carries the CUresult code."""


class BatchDMA:
    """Issues batched copies through the CUDA driver. One instance per process is enough.

    `available` is False when the driver library cannot be loaded (no GPU build); `batched`
    says whether cuMemcpyBatchAsync exists (else copies are looped).
    """

    _instance: BatchDMA | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.available = False
        self.batched = False
        self._v2 = False
        self._lib: ctypes.CDLL | None = None
        name = ctypes.util.find_library("cuda") or "libcuda.so.1"
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            try:
                lib = ctypes.CDLL("libcuda.so.1")
            except OSError:
                return
        self._lib = lib
        self.available = True
        self._attrs = _MemcpyAttributes()
        self._attrs.srcAccessOrder = _CU_MEMCPY_SRC_ACCESS_ORDER_STREAM
        self._attr_idx = (ctypes.c_size_t * 1)(0)
        self._fail_idx = ctypes.c_size_t(0)
        p = ctypes.c_void_p
        sz = ctypes.c_size_t
        for sym, v2 in (("cuMemcpyBatchAsync_v2", True), ("cuMemcpyBatchAsync", False)):
            fn = getattr(lib, sym, None)
            if fn is None:
                continue
            fn.restype = ctypes.c_int
            if v2:
                fn.argtypes = [p, p, p, sz, p, p, sz, p]
            else:
                fn.argtypes = [p, p, p, sz, p, p, sz, p, p]
            self._batch = fn
            self._v2 = v2
            self.batched = True
            break
        self._single = lib.cuMemcpyAsync
        self._single.restype = ctypes.c_int
        self._single.argtypes = [ctypes.c_uint64, ctypes.c_uint64, sz, p]

    @classmethod
    def get(cls) -> BatchDMA:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def copy(
        self,
        dsts: np.ndarray,
        srcs: np.ndarray,
        sizes: np.ndarray,
        stream: int,
        *,
        loop: bool = False,
    ) -> None:
        """Enqueue copies dsts[i] <- srcs[i] (sizes[i] bytes) on `stream` (a CUstream handle,
        never the legacy default stream). The arrays are read during the call only. `loop`:
        one cuMemcpyAsync per copy even where the batched call exists (few large copies).
        Raises DMAError on a driver error; nothing is enqueued after the failing item."""
        if not self.available:
            raise DMAError("the CUDA driver library is not available")
        count = int(sizes.size)
        if count == 0:
            return
        dsts = np.ascontiguousarray(dsts, dtype=np.uint64)
        srcs = np.ascontiguousarray(srcs, dtype=np.uint64)
        sizes = np.ascontiguousarray(sizes, dtype=np.uint64)
        if self.batched and not loop:
            args: list[object] = [
                dsts.ctypes.data,
                srcs.ctypes.data,
                sizes.ctypes.data,
                count,
                ctypes.addressof(self._attrs),
                ctypes.addressof(self._attr_idx),
                1,
            ]
            if not self._v2:
                args.append(ctypes.addressof(self._fail_idx))
            err = self._batch(*args, ctypes.c_void_p(stream))
            if err != 0:
                raise DMAError(f"cuMemcpyBatchAsync failed with CUresult {err}")
            return
        for d, s, n in zip(dsts.tolist(), srcs.tolist(), sizes.tolist()):
            err = self._single(d, s, n, ctypes.c_void_p(stream))
            if err != 0:
                raise DMAError(f"cuMemcpyAsync failed with CUresult {err}")


def merge_runs(
    dsts: np.ndarray, srcs: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge consecutive items of equal `size` whose source and destination both continue the
    previous item's (fewer, larger copies). Returns (dsts, srcs, sizes)."""
    if dsts.size == 0:
        return dsts, srcs, np.zeros(0, dtype=np.uint64)
    d = dsts.astype(np.int64)
    s = srcs.astype(np.int64)
    cont = np.empty(d.size, dtype=bool)
    cont[0] = False
    cont[1:] = (d[1:] == d[:-1] + size) & (s[1:] == s[:-1] + size)
    starts = np.flatnonzero(~cont)
    lengths = np.diff(np.append(starts, d.size)) * size
    return (
        d[starts].astype(np.uint64),
        s[starts].astype(np.uint64),
        lengths.astype(np.uint64),
    )
