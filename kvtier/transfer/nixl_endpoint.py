"""A NIXL agent holding one instance's KV regions, registered once, and its control socket.

`NixlEndpoint` is the common part of the prefill sender and the decode receiver in
`kvtier.transfer.nixl_transport`: it loads NIXL, registers the plan's regions (DRAM or VRAM),
adopts a validated peer (layout, tensor table and NIXL metadata) and watches the control
connection for the peer's exit.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import logging
import os
import select
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

from kvtier.errors import ConfigError
from kvtier.geometry.groups import KVCacheSpec
from kvtier.transfer.handshake import HandshakeError, PeerInfo, check_fingerprint
from kvtier.transfer.registration import RegistrationPlan, TensorMemory, same_layout

_names = itertools.count()

# UCX settings kvtier applies unless the user's environment sets them (UCX reads its config
# when NIXL creates the UCX backend, so they must be in os.environ before the agent exists).
# Empty on purpose: on 2x H200 (bench/results/pd-h200x2-2026-11-22) keeping every CUDA IPC
# mapping open (UCX_CUDA_IPC_CACHE_MAX_REGIONS/_SIZE=inf) measured 67% of peer copy against 82%
# without, and NIXL_UCX_SGL_ENABLE=1 lifted block runs (20% -> 57%) and scattered blocks (3% ->
# 20%) but lowered contiguous requests (82% -> 69%). Users choose per workload.
UCX_DEFAULTS: dict[str, str] = {}


def apply_ucx_defaults(
    env: dict[str, str] | os._Environ[str] | None = None,
    defaults: dict[str, str] | None = None,
) -> dict[str, str]:
    """Put `defaults` (UCX_DEFAULTS) into `env` (os.environ) where unset; return the values in
    effect."""
    target = os.environ if env is None else env
    for key, value in (UCX_DEFAULTS if defaults is None else defaults).items():
        target.setdefault(key, value)
    return {k: target[k] for k in sorted(target)
            if k.startswith(("UCX_", "NIXL_UCX_"))}


def load_nixl() -> Any:
    """The NIXL Python API module (`nixl`, else the `nixl_cu13` / `nixl_cu12` wheels)."""
    for name in ("nixl._api", "nixl_cu13._api", "nixl_cu12._api"):
        try:
            api = importlib.import_module(name)
        except ImportError:
            continue
        _logs_to_stderr()
        return api
    raise ConfigError("transport", "nixl", "the nixl package: pip install --no-deps nixl-cu12")


def _logs_to_stderr() -> None:
    """NIXL's Python logger writes to stdout; move it to stderr so that a command's stdout
    (e.g. `kvtier bench tiers --json`) stays its own output."""
    for handler in logging.getLogger("nixl").handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)


@dataclass(frozen=True)
class TransferReport:
    """One request's transfer: bytes moved, descriptors used, wall seconds."""

    request_id: str
    nbytes: int
    descriptors: int
    seconds: float


@dataclass(frozen=True)
class PreparedSend:
    """NIXL handles for one set of blocks, built once and posted any number of times."""

    dst: dict[int, list[int]]
    nbytes: int
    descriptors: int
    handles: tuple[Any, ...]


def mem_type_of(plan: RegistrationPlan) -> str:
    """The one memory type ("DRAM" or "VRAM") of a plan's regions; ConfigError if mixed."""
    kinds = {r.mem_type for r in plan.regions}
    if len(kinds) != 1:
        raise ConfigError("tensors", sorted(kinds), "all KV tensors in DRAM or all in VRAM")
    return kinds.pop()


class NixlEndpoint:
    """A NIXL agent with this instance's KV regions registered once. Not thread-safe."""

    def __init__(self, role: str, spec: KVCacheSpec, tensors: Mapping[str, TensorMemory],
                 fingerprint: bytes, name: str | None = None, backends: Sequence[str] = ("UCX",),
                 timeout: float = 10.0,
                 backend_params: Mapping[str, Mapping[str, str]] | None = None) -> None:
        self.fingerprint = check_fingerprint(fingerprint)
        self.plan = RegistrationPlan(spec, tensors)
        self.tensors = dict(tensors)
        self.mem_type = mem_type_of(self.plan)
        self.timeout = timeout
        self.name = name or f"kvtier-{role}-{id(self):x}-{next(_names)}"
        self.ucx_env = apply_ucx_defaults()
        api = load_nixl()
        params = {b: dict(p) for b, p in (backend_params or {}).items()}
        unknown = sorted(set(params) - set(backends))
        if unknown:
            raise ConfigError("backend_params", unknown, f"params of listed backends {backends}")
        # backends with parameters (e.g. UCX num_workers) are created after the agent
        self.agent = api.nixl_agent(self.name, api.nixl_agent_config(
            backends=[b for b in backends if b not in params]))
        for b, p in params.items():
            if b in self.agent.plugin_list:
                self.agent.create_backend(b, p)
        missing = [b for b in backends if b not in self.agent.backends]
        if missing:
            raise ConfigError("backends", missing, f"backends NIXL has: {self.agent.plugin_list}")
        self._reg = self.agent.register_memory(
            [(r.base, r.nbytes, r.device_id, "") for r in self.plan.regions], self.mem_type)
        self.sock: socket.socket | None = None
        self.peer: PeerInfo | None = None
        self.remote_plan: RegistrationPlan | None = None

    @property
    def registered_regions(self) -> int:
        return len(self.plan.regions)

    def info(self) -> PeerInfo:
        return PeerInfo(self.name, self.plan.spec, self.tensors)

    def _info_doc(self) -> dict[str, Any]:
        """The handshake document this side sends (subclasses may add keys)."""
        return self.info().to_doc()

    def _adopt_peer(self, frame_doc: dict[str, Any], blob: bytes) -> None:
        peer = PeerInfo.from_doc(frame_doc)
        if not same_layout(self.plan.spec, peer.spec):
            raise HandshakeError(f"{peer.agent} lays its KV cache out differently")
        try:
            remote_plan = RegistrationPlan(peer.spec, peer.tensors)
            added = self.agent.add_remote_agent(blob)
        except ConfigError as exc:
            raise HandshakeError(f"bad tensor table from {peer.agent}: {exc}") from exc
        except Exception as exc:  # NIXL raises its own types for bad metadata
            raise HandshakeError(f"NIXL rejected metadata of {peer.agent}: {exc}") from exc
        name = added.decode() if isinstance(added, bytes) else str(added)
        if name != peer.agent:
            self.agent.remove_remote_agent(name)
            raise HandshakeError(f"metadata names agent {name!r}, handshake said {peer.agent!r}")
        self.peer, self.remote_plan = peer, remote_plan

    def peer_alive(self) -> bool:
        """False once the control connection is closed (the peer exited or died)."""
        if self.sock is None:
            return False
        readable, _, _ = select.select([self.sock], [], [], 0)
        if not readable:
            return True
        try:
            return self.sock.recv(1, socket.MSG_PEEK) != b""
        except OSError:
            return False

    def close(self) -> None:
        """Drop the peer and deregister memory; safe to call twice."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.peer is not None:
            # the peer may be gone; nothing is left to release then
            with contextlib.suppress(Exception):
                self.agent.remove_remote_agent(self.peer.agent)
            self.peer = None
        if self._reg is not None:
            self.agent.deregister_memory(self._reg)
            self._reg = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
