"""Real storage servers on free loopback ports, for `kvtier bench tiers` and the tests.

Imports nothing from kvtier, so the tests can use it to start the servers they test against.

    srv = RedisServer.start()          # redis-server (or valkey-server) on 127.0.0.1:<free port>
    srv.url                            # "redis://127.0.0.1:<port>/0"
    srv.kill(); srv.restart()          # fault injection: SIGKILL, then a new process, same port
    srv.stop()

    m = MooncakeMaster.start()         # mooncake_master, RPC on 127.0.0.1:<free port>
    m.addr                             # "127.0.0.1:<port>"

`start()` waits until the server accepts connections and raises ServerUnavailable when the
binary is missing (tests skip on that) or the server does not come up in time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


class ServerUnavailable(RuntimeError):
    """The server binary is not installed or did not start."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(
    port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerUnavailable(f"server exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise ServerUnavailable(f"nothing listening on 127.0.0.1:{port} after {timeout:.0f} s")


def listening_addresses(pid: int) -> list[str]:
    """Local addresses `pid` listens on (from `ss`; empty when ss is missing)."""
    if shutil.which("ss") is None:
        return []
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=False).stdout
    return [line.split()[3] for line in out.splitlines() if f"pid={pid}," in line]


class _Server:
    """A child process on a fixed loopback port that can be killed and restarted."""

    def __init__(self, argv: list[str], port: int, workdir: Path, log_name: str) -> None:
        self.argv = argv
        self.port = port
        self.workdir = workdir
        self.log_path = workdir / log_name
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, timeout: float = 15.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child from here
        try:
            self.proc = subprocess.Popen(
                self.argv, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        finally:
            log.close()
        try:
            wait_port(self.port, timeout, self.proc)
        except ServerUnavailable as exc:
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise ServerUnavailable(f"{exc}; log:\n{tail}") from exc

    @property
    def pid(self) -> int:
        assert self.proc is not None, "server not running"
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash: no clean shutdown, connections drop mid-request."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing (a hung server)."""
        if self.alive:
            os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.alive:
            os.kill(self.pid, signal.SIGCONT)

    def restart(self, timeout: float = 15.0) -> None:
        self.kill()
        # the old listener may linger for a moment; the port itself is free (SO_REUSEADDR)
        self._spawn(timeout)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> _Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisServer(_Server):
    @classmethod
    def start(cls, binary: str | None = None, maxmemory: str | None = None) -> RedisServer:
        exe = binary or shutil.which("redis-server") or shutil.which("valkey-server")
        if exe is None:
            raise ServerUnavailable("redis-server not installed (apt-get install -y redis-server)")
        port = free_port()
        workdir = Path(tempfile.mkdtemp(prefix="kvtier-redis-"))
        argv = [
            exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--protected-mode", "yes", "--dir", str(workdir),
        ]
        if maxmemory:
            argv += ["--maxmemory", maxmemory, "--maxmemory-policy", "allkeys-lru"]
        srv = cls(argv, port, workdir, "redis.log")
        srv._spawn()
        return srv

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def mooncake_master_binary() -> str | None:
    """The mooncake_master executable itself (not the Python entry-point wrapper, so that
    signals reach the server and not a shell in between)."""
    try:
        import mooncake
    except ImportError:
        return None
    exe = Path(mooncake.__file__).parent / "mooncake_master"
    return str(exe) if exe.is_file() else shutil.which("mooncake_master")


class MooncakeMaster(_Server):
    @classmethod
    def start(cls, extra: list[str] | None = None) -> MooncakeMaster:
        exe = mooncake_master_binary()
        if exe is None:
            raise ServerUnavailable(
                "mooncake_master not installed (pip install mooncake-transfer-engine-non-cuda)"
            )
        port, metrics = free_port(), free_port()
        workdir = Path(tempfile.mkdtemp(prefix="kvtier-mooncake-"))
        # Every listener on loopback: RPC and the metrics/admin server; no HTTP metadata server
        # (clients use the P2P handshake instead).
        argv = [
            exe, f"--rpc_port={port}", "--rpc_address=127.0.0.1",
            "--metrics_host=127.0.0.1", f"--metrics_port={metrics}",
            "--enable_http_metadata_server=false", "--rpc_thread_num=2", *(extra or []),
        ]
        srv = cls(argv, port, workdir, "master.log")
        srv._spawn(30.0)
        return srv

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"
