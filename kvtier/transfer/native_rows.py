"""kvtier's C row copier (kvtier/transfer/csrc/rowcopy.c), built at install next to this file.

One call copies a job's rows, each `length` bytes from src[i] to dst[i] (absolute addresses),
prefetching the next rows' source while it copies: on scattered 4-18 KiB rows that reached
0.9-1.1 of a plain memcpy where torch's index_select and numpy's row indexing reached 0.4-0.8
(same machine, interleaved runs). ctypes releases the GIL for the call, so several threads
copy at once.

The library is optional (`library()` is None without it, or with KVTIER_NATIVE_ROWS=0): the
CPU path then copies with torch and numpy, bit for bit the same (tested).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
from pathlib import Path

import numpy as np

ENV = "KVTIER_NATIVE_ROWS"
_VERSION = 1


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded library, or None when it was not built or is switched off (ENV=0)."""
    if os.environ.get(ENV, "1") == "0":
        return None
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_rowcopy{suffix}"
        if path.exists():
            lib = ctypes.CDLL(str(path))
            if lib.kvtier_rowcopy_version() != _VERSION:
                raise RuntimeError(f"{path} is a different build; reinstall kvtier")
            lib.kvtier_copy_rows.argtypes = [
                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
            ]
            lib.kvtier_copy_rows.restype = None
            return lib
    return None


def copy_rows(dst: np.ndarray, src: np.ndarray, length: int, nontemporal: bool) -> None:
    """Copy `length` bytes from address src[i] to address dst[i] for every i (int64 arrays of
    one size, C-contiguous). `nontemporal` writes around the caches (x86-64, 16-byte aligned
    rows of whole 64-byte lines; others are copied normally). The caller guarantees every
    address range is valid and that no two rows overlap. Raises RuntimeError without the
    library."""
    lib = library()
    if lib is None:
        raise RuntimeError("kvtier's row copier is not built (see native_rows.library)")
    if dst.dtype != np.int64 or src.dtype != np.int64 or dst.shape != src.shape:
        raise ValueError("dst and src must be int64 arrays of one shape")
    if not (dst.flags.c_contiguous and src.flags.c_contiguous):
        raise ValueError("dst and src must be C-contiguous")
    lib.kvtier_copy_rows(dst.ctypes.data, src.ctypes.data, dst.size, length, int(nontemporal))
