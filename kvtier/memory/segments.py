"""Segments: named shares of GPU memory, one per engine instance (or TP group), with limits.

State lives under a run directory (`KVTIER_RUN_DIR`; default `/dev/shm/kvtier-<uid>`, else
`$XDG_RUNTIME_DIR/kvtier`, else `/tmp/kvtier-<uid>`):

    <run>/lock                 fcntl lock taken (exclusively) by every writer
    <run>/segments/<name>.json one segment: owners, limit, shared-GPU budgets, usage
    <run>/stats/<name>.json    optional cache statistics a segment's cache publishes (`top`)

Writers take the lock, read, modify and atomically replace the file, so readers never need the
lock and never see a torn file. The files go away with the segment (`remove`, the last owner's
`detach`, or `gc` once every owner pid is dead).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from kvtier.errors import ConfigError
from kvtier.memory.elastic_layout import LimitSource, PoolLimits

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
FORMAT_VERSION = 1


def default_run_dir() -> Path:
    env = os.environ.get("KVTIER_RUN_DIR")
    if env:
        return Path(env)
    uid = os.getuid()
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return Path(f"/dev/shm/kvtier-{uid}")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "kvtier"
    return Path(f"/tmp/kvtier-{uid}")


def pid_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass(frozen=True)
class SegmentState:
    """One segment. `limit` caps all GPUs together (None: unlimited); `shared` maps a peer GPU
    to the bytes this segment may place there; `usage` is bytes mapped per GPU, as published."""

    name: str
    pids: tuple[int, ...] = ()
    local_gpu: int = 0
    device_count: int = 1
    limit: int | None = None
    shared: tuple[tuple[int, int], ...] = ()
    usage: tuple[tuple[int, int], ...] = ()
    created: float = 0.0
    updated: float = 0.0

    def limits(self) -> PoolLimits:
        return PoolLimits(self.limit, self.shared)

    def alive(self) -> bool:
        return any(pid_alive(p) for p in self.pids)

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["version"] = FORMAT_VERSION
        data["shared"] = {str(g): b for g, b in self.shared}
        data["usage"] = {str(g): b for g, b in self.usage}
        data["pids"] = list(self.pids)
        return data

    @classmethod
    def from_json(cls, data: dict[str, object]) -> SegmentState:
        def pairs(key: str) -> tuple[tuple[int, int], ...]:
            raw = data.get(key) or {}
            assert isinstance(raw, dict)
            return tuple(sorted((int(g), int(b)) for g, b in raw.items()))

        limit = data.get("limit")
        return cls(
            name=str(data["name"]),
            pids=tuple(int(p) for p in data.get("pids", ())),  # type: ignore[attr-defined]
            local_gpu=int(data.get("local_gpu", 0)),  # type: ignore[call-overload]
            device_count=int(data.get("device_count", 1)),  # type: ignore[call-overload]
            limit=None if limit is None else int(limit),  # type: ignore[call-overload]
            shared=pairs("shared"),
            usage=pairs("usage"),
            created=float(data.get("created", 0.0)),  # type: ignore[arg-type]
            updated=float(data.get("updated", 0.0)),  # type: ignore[arg-type]
        )


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ConfigError("segment", name, "1-64 characters of letters, digits, '_', '.', '-'")
    return name


class SegmentRegistry:
    """All segments of one run directory. Safe across processes (file lock + atomic replace)."""

    def __init__(self, run_dir: str | Path | None = None) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else default_run_dir()
        self.seg_dir = self.run_dir / "segments"
        self.stats_dir = self.run_dir / "stats"

    def path(self, name: str) -> Path:
        return self.seg_dir / f"{check_name(name)}.json"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.seg_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.run_dir / "lock", "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _write(self, path: Path, data: dict[str, object]) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, name: str) -> SegmentState:
        """The segment, or ConfigError naming the segments that exist."""
        try:
            data = json.loads(self.path(name).read_text(encoding="utf-8"))
        except FileNotFoundError:
            known = [s.name for s in self.segments()]
            raise ConfigError("segment", name, f"an existing segment ({known or 'none'})") from None
        return SegmentState.from_json(data)

    def segments(self) -> list[SegmentState]:
        out = []
        for path in sorted(self.seg_dir.glob("*.json")) if self.seg_dir.is_dir() else []:
            try:
                out.append(SegmentState.from_json(json.loads(path.read_text(encoding="utf-8"))))
            except (OSError, ValueError, KeyError, AssertionError):
                continue  # removed meanwhile, or not ours
        return out

    def update(self, name: str, change: Callable[[SegmentState], SegmentState]) -> SegmentState:
        """Apply `change` to an existing segment under the lock; returns the new state."""
        with self._locked():
            state = change(self.get(name))
            state = replace(state, updated=time.time())
            self._write(self.path(name), state.to_json())
            return state

    def attach(
        self,
        name: str,
        pid: int | None = None,
        local_gpu: int = 0,
        device_count: int = 1,
        limit: int | None = None,
    ) -> SegmentState:
        """Join (or create) a segment as owner `pid` (default: this process). Settings an
        operator made before are kept; dead owners are dropped."""
        pid = os.getpid() if pid is None else pid
        with self._locked():
            try:
                old = self.get(name)
            except ConfigError:
                old = SegmentState(check_name(name), limit=limit, created=time.time())
            pids = (*(p for p in old.pids if p != pid and pid_alive(p)), pid)
            state = replace(old, pids=pids, local_gpu=local_gpu, device_count=device_count,
                            updated=time.time())
            self._write(self.path(name), state.to_json())
            return state

    def detach(self, name: str, pid: int | None = None) -> None:
        """Leave a segment; the last owner to leave removes it (settings included)."""
        pid = os.getpid() if pid is None else pid
        with self._locked():
            try:
                state = self.get(name)
            except ConfigError:
                return
            pids = tuple(p for p in state.pids if p != pid and pid_alive(p))
            if pids:
                self._write(self.path(name), replace(state, pids=pids).to_json())
            else:
                self._remove_files(name)

    def remove(self, name: str) -> None:
        with self._locked():
            self.get(name)
            self._remove_files(name)

    def gc(self) -> list[str]:
        """Remove segments whose owner processes are all dead; return their names."""
        removed = []
        with self._locked():
            for state in self.segments():
                if not state.alive():
                    self._remove_files(state.name)
                    removed.append(state.name)
        return removed

    def _remove_files(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)
        (self.stats_dir / f"{name}.json").unlink(missing_ok=True)

    # -- limits -------------------------------------------------------------------------------
    def set_limit(self, name: str, limit: int | None) -> SegmentState:
        return self.update(name, lambda s: replace(s, limit=limit))

    def set_shared(self, name: str, gpu: int, nbytes: int) -> SegmentState:
        """Budget `nbytes` on peer `gpu` for the segment (0 removes the GPU from its list)."""
        state = self.get(name)
        if not 0 <= gpu < state.device_count or gpu == state.local_gpu:
            allowed = f"a GPU 0..{state.device_count - 1} other than local GPU {state.local_gpu}"
            raise ConfigError("gpu", gpu, allowed)

        def change(s: SegmentState) -> SegmentState:
            shared = dict(s.shared)
            if nbytes:
                shared[gpu] = nbytes
            else:
                shared.pop(gpu, None)
            return replace(s, shared=tuple(sorted(shared.items())))

        return self.update(name, change)

    def publish_usage(self, name: str, usage: dict[int, int]) -> None:
        self.update(name, lambda s: replace(s, usage=tuple(sorted(usage.items()))))

    # -- cache statistics (for `kvtier top`) --------------------------------------------------
    def write_stats(self, name: str, tiers: dict[str, dict[str, float]]) -> None:
        """Publish per-tier counters, e.g. {"host": {"hits": 10, "misses": 2, "bytes": 1e9}}."""
        self.stats_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._write(self.stats_dir / f"{check_name(name)}.json",
                    {"segment": name, "updated": time.time(), "tiers": tiers})

    def read_stats(self, name: str) -> dict[str, dict[str, float]]:
        try:
            data = json.loads((self.stats_dir / f"{name}.json").read_text(encoding="utf-8"))
            return dict(data.get("tiers", {}))
        except (OSError, ValueError):
            return {}


class SegmentLimits(LimitSource):
    """A pool's limits read from its segment file (re-parsed only when the file changes) and
    its usage published back, at most every `publish_interval` seconds unless forced."""

    def __init__(self, registry: SegmentRegistry, name: str, publish_interval: float = 0.5):
        self.registry = registry
        self.name = name
        self.publish_interval = publish_interval
        self._stamp: tuple[int, int] | None = None
        self._limits = PoolLimits()
        self._last_publish = 0.0
        self._last_usage: dict[int, int] | None = None

    def current(self) -> PoolLimits:
        try:
            st = os.stat(self.registry.path(self.name))
        except OSError:
            return self._limits  # segment removed under us: keep the last known limits
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp != self._stamp:
            try:
                self._limits = self.registry.get(self.name).limits()
                self._stamp = stamp
            except (ConfigError, OSError, ValueError):
                pass
        return self._limits

    def publish(self, usage: dict[int, int], force: bool = False) -> None:
        now = time.monotonic()
        if usage == self._last_usage and not force:
            return
        if not force and now - self._last_publish < self.publish_interval:
            return
        try:
            self.registry.publish_usage(self.name, usage)
        except (ConfigError, OSError):
            return
        self._last_publish, self._last_usage = now, dict(usage)
