"""kvtier's native helpers (kvtier/transfer/csrc/*.c), one library built at install next to
this file and loaded through ctypes, which releases the GIL for every call:

- `copy_rows`: a job's rows, each `length` bytes from src[i] to dst[i] (absolute addresses),
  prefetching the next rows' source while it copies. On scattered 4-18 KiB rows that reached
  0.9-1.1 of a plain memcpy where torch's index_select and numpy's row indexing reached
  0.4-0.8 (same machine, interleaved runs). The CPU path (kvtier.transfer.cpu_rows) uses it.
- `check_job`: a copy job's range and duplicate checks in one call instead of a numpy sort
  and several calls (kvtier.transfer.job_args), on every submit's critical path.
- `plan_copies`: a staged job's host copies (kvtier.transfer.staged_plan), also made before
  the job's first copy.

The library is optional (`library()` is None without it, or with KVTIER_NATIVE=0): the callers
then run their torch/numpy versions, which the tests hold to the same results.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
from pathlib import Path

import numpy as np

ENV = "KVTIER_NATIVE"
_VERSION = 3
_P, _N = ctypes.c_void_p, ctypes.c_int64
# kvtier_check_job's answers (csrc/job_check.c)
WRITTEN_RANGE, OTHER_RANGE, WRITTEN_TWICE, NO_MEMORY = 1, 2, 3, 4


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded library, or None when it was not built or is switched off (ENV=0)."""
    if os.environ.get(ENV, "1") == "0":
        return None
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_native{suffix}"
        if path.exists():
            lib = ctypes.CDLL(str(path))
            if lib.kvtier_native_version() != _VERSION:
                raise RuntimeError(f"{path} is a different build; reinstall kvtier")
            lib.kvtier_copy_rows.argtypes = [_P, _P, _N, _N, ctypes.c_int]
            lib.kvtier_copy_rows.restype = None
            lib.kvtier_check_job.argtypes = [_P, _N, _N, _P, _N, _N]
            lib.kvtier_check_job.restype = ctypes.c_int
            lib.kvtier_plan_copies.argtypes = [_P, _N, _N, _N, _N, _N, _N, _N, _N, _P, _P, _P,
                                               _P, _P]
            lib.kvtier_plan_copies.restype = ctypes.c_int64
            return lib
    return None


def _lib() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError("kvtier's native library is not built (see native.library)")
    return lib


def _int64_arrays(*arrays: np.ndarray) -> None:
    for a in arrays:
        if a.dtype != np.int64:
            raise ValueError("arrays must be int64")
        if not a.flags.c_contiguous:
            raise ValueError("arrays must be C-contiguous")


def copy_rows(dst: np.ndarray, src: np.ndarray, length: int, nontemporal: bool) -> None:
    """Copy `length` bytes from address src[i] to address dst[i] for every i (int64 arrays of
    one shape, C-contiguous). `nontemporal` writes around the caches (x86-64, 16-byte aligned
    rows of whole 64-byte lines; others are copied normally). The caller guarantees every
    address range is valid and that no two rows overlap. Raises RuntimeError without the
    library."""
    lib = _lib()
    if dst.shape != src.shape:
        raise ValueError("dst and src must be int64 arrays of one shape")
    _int64_arrays(dst, src)
    lib.kvtier_copy_rows(dst.ctypes.data, src.ctypes.data, dst.size, length, int(nontemporal))


def check_job(written: np.ndarray, w_limit: int, other: np.ndarray, o_limit: int) -> int:
    """0 when every `written` value is in [0, w_limit) and distinct and every `other` value in
    [0, o_limit); else WRITTEN_RANGE, OTHER_RANGE, WRITTEN_TWICE (first failure in that order)
    or NO_MEMORY. Int64 C-contiguous arrays. Raises RuntimeError without the library."""
    lib = _lib()
    _int64_arrays(written, other)
    return int(lib.kvtier_check_job(written.ctypes.data, written.size, w_limit,
                                    other.ctypes.data, other.size, o_limit))


def plan_copies(
    slots: np.ndarray,
    slot_bytes: int,
    host_off: int,
    stride: int,
    shift: int,
    size0: int,
    ppc: int,
    step: int,
    buffers: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(host, stage, size, bounds) of a one-run staged job (see csrc/job_plan.c): page i of
    chunk i // ppc at staging offset (i % ppc) * stride + shift (+ buffers[chunk]), its host
    bytes at slots[i] * slot_bytes + host_off, size0 bytes each; consecutive pages of a chunk
    whose slots are `step` apart (step > 0) merge. Raises RuntimeError without the library."""
    lib = _lib()
    _int64_arrays(slots, *([] if buffers is None else [buffers]))
    n = int(slots.size)
    chunks = -(-n // ppc)
    if buffers is not None and buffers.size < chunks:
        raise ValueError(f"{chunks} chunks need as many buffers, got {buffers.size}")
    out = np.empty(3 * n + chunks + 1, dtype=np.int64)  # one allocation, four views
    at = out.ctypes.data
    m = lib.kvtier_plan_copies(slots.ctypes.data, n, slot_bytes, host_off, stride, shift, size0,
                               ppc, step, None if buffers is None else buffers.ctypes.data,
                               at, at + 8 * n, at + 16 * n, at + 24 * n)
    return out[:m], out[n : n + m], out[2 * n : 2 * n + m], out[3 * n :]
