"""CUDA IPC between two processes of one host: a receiver offers its KV memory, a sender maps it.

On one host the fastest way into a peer GPU's KV blocks is to map them: the sender's own
kernel then writes the request's rows straight into the receiver's blocks over NVLink, with no
staging slot, no scatter and no per-descriptor cost (kvtier.transfer.peer_rows). NIXL still
carries the handshake and the completion notification.

The receiver's offer is JSON: per registered region, the 64-byte handle of the cudaMalloc
allocation holding it and the region's offset inside that allocation, plus the host's boot id
and the GPU's UUID, so that a sender on another host or without peer access never tries.
Memory that legacy IPC cannot export (CUDA virtual memory, torch's expandable segments) gives
no offer, and the sender moves the request over NIXL instead. Driver calls go through ctypes
against libcuda (no extra dependency); none runs on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from kvtier.transfer.handshake import HandshakeError
from kvtier.transfer.registration import HOST, Region

_HANDLE_BYTES = 64
_LAZY_ENABLE_PEER_ACCESS = 1
_HEX = re.compile(r"[0-9a-f]{128}")


class _Handle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * _HANDLE_BYTES)]


class IpcError(RuntimeError):
    """A CUDA driver call failed (its CUresult is in the message)."""


@cache
def _driver() -> Any:
    lib = ctypes.CDLL("libcuda.so.1")
    u64p = ctypes.POINTER(ctypes.c_uint64)
    lib.cuIpcGetMemHandle.argtypes = [ctypes.POINTER(_Handle), ctypes.c_uint64]
    lib.cuMemGetAddressRange_v2.argtypes = [u64p, ctypes.POINTER(ctypes.c_size_t),
                                            ctypes.c_uint64]
    lib.cuIpcOpenMemHandle_v2.argtypes = [u64p, _Handle, ctypes.c_uint]
    lib.cuIpcCloseMemHandle.argtypes = [ctypes.c_uint64]
    lib.cuMemcpyHtoDAsync_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t,
                                         ctypes.c_void_p]
    return lib


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise IpcError(f"{what} failed: CUresult {rc}")


def host_id() -> str:
    """This host's boot id: equal for two processes exactly when they share a kernel."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def gpu_uuid(device: int) -> str:
    import torch

    return str(torch.cuda.get_device_properties(device).uuid)


@dataclass(frozen=True)
class Export:
    """One region as a peer can map it: the allocation's handle and the region's offset."""

    handle: str  # 128 hex digits
    offset: int
    nbytes: int


def offer(regions: Sequence[Region]) -> dict[str, Any] | None:
    """The IPC offer of `regions` (all on one GPU), or None where they cannot be exported:
    host memory, several GPUs, CUDA virtual memory, or no driver."""
    devices = {r.device for r in regions}
    if len(devices) != 1 or HOST in devices or not regions:
        return None
    device = devices.pop()
    try:
        import torch

        with torch.cuda.device(device):
            torch.cuda.synchronize(device)  # the device's primary context is current
            lib = _driver()
            exports = []
            for r in regions:
                base, size = ctypes.c_uint64(), ctypes.c_size_t()
                _check(lib.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size),
                                                   r.base), "cuMemGetAddressRange")
                h = _Handle()
                _check(lib.cuIpcGetMemHandle(ctypes.byref(h), base.value), "cuIpcGetMemHandle")
                exports.append(Export(bytes(h.reserved).hex(), r.base - base.value, r.nbytes))
            uuid = gpu_uuid(device)
    except (OSError, IpcError, RuntimeError):
        return None  # not exportable here: the sender uses NIXL
    return {"host": host_id(), "gpu": uuid,
            "regions": [[e.handle, e.offset, e.nbytes] for e in exports]}


@dataclass(frozen=True)
class Offer:
    """A peer's validated offer: where its memory lives and how to map each region."""

    host: str
    gpu: str
    exports: tuple[Export, ...]


def parse_offer(doc: Any, regions: Sequence[Region]) -> Offer | None:
    """A peer's offer validated against its registered `regions` (from the same handshake):
    None when there is none; HandshakeError when it is malformed."""
    if doc is None:
        return None
    ok = isinstance(doc, dict) and isinstance(doc.get("host"), str) \
        and isinstance(doc.get("gpu"), str) and isinstance(doc.get("regions"), list) \
        and len(doc["regions"]) == len(regions)
    out: list[Export] = []
    for entry, region in zip(doc["regions"] if ok else [], regions):
        good = isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) \
            and _HEX.fullmatch(entry[0]) is not None \
            and all(isinstance(v, int) and not isinstance(v, bool) for v in entry[1:]) \
            and entry[1] >= 0 and entry[2] == region.nbytes
        if not good:
            ok = False
            break
        out.append(Export(*entry))
    if not ok:
        raise HandshakeError(f"bad IPC offer {str(doc)[:200]!r}")
    return Offer(doc["host"], doc["gpu"], tuple(out))


class PeerMemory:
    """A peer's regions mapped into this process, on the context of local GPU `device`; closed
    by `close()`. `base(i)` is region i's address here."""

    def __init__(self, exports: Sequence[Export], device: int) -> None:
        import torch

        self.device = device
        self._mapped: dict[str, int] = {}  # allocation handle -> address here
        lib = _driver()
        with torch.cuda.device(device):
            torch.cuda.synchronize(device)
            try:
                for e in exports:
                    if e.handle in self._mapped:  # several regions of one allocation
                        continue
                    h = _Handle()
                    h.reserved[:] = bytes.fromhex(e.handle)
                    ptr = ctypes.c_uint64()
                    _check(lib.cuIpcOpenMemHandle_v2(ctypes.byref(ptr), h,
                                                     _LAZY_ENABLE_PEER_ACCESS),
                           "cuIpcOpenMemHandle")
                    self._mapped[e.handle] = ptr.value
            except BaseException:
                self.close()
                raise
        self._bases = [self._mapped[e.handle] + e.offset for e in exports]

    def base(self, region: int) -> int:
        return self._bases[region]

    def close(self) -> None:
        """Unmap everything; safe to call twice."""
        if not self._mapped:
            return
        import torch

        lib = _driver()
        with torch.cuda.device(self.device):
            for ptr in self._mapped.values():
                with contextlib.suppress(Exception):
                    lib.cuIpcCloseMemHandle(ptr)
        self._mapped = {}


def upload(dst: int, src: int, nbytes: int, stream: int) -> None:
    """Enqueue `nbytes` from pinned host memory at `src` to device memory at `dst` on CUDA
    stream handle `stream`, with the device's context current. One driver call: a few us of
    CPU where torch's copy_ takes tens, and it can be captured into a CUDA graph."""
    _check(_driver().cuMemcpyHtoDAsync_v2(dst, src, nbytes, stream), "cuMemcpyHtoDAsync")


def open_offer(peer: Offer, device: int) -> PeerMemory | None:
    """Map a peer's offer on local GPU `device` when it can be used from here: same host, the
    peer's GPU visible and reachable by peer access (or the same GPU). None otherwise, or when
    the driver refuses; the caller then moves data over NIXL."""
    if peer.host != host_id() or not host_id():
        return None
    import torch

    try:
        remote = next((i for i in range(torch.cuda.device_count())
                       if gpu_uuid(i) == peer.gpu), None)
        if remote is None or (remote != device
                              and not torch.cuda.can_device_access_peer(device, remote)):
            return None
        return PeerMemory(peer.exports, device)
    except (OSError, IpcError, RuntimeError):
        return None


__all__ = ["Export", "IpcError", "Offer", "PeerMemory", "host_id", "offer", "open_offer",
           "parse_offer", "upload"]
