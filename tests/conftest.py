"""Shared fixtures: real servers on loopback ports, for the tier and the cache tests.

tests/servers.py is importable from every test folder once this conftest has run (it puts the
tests/ directory on sys.path; pytest's default import mode only adds each test's own folder).

A suite whose server or package is missing is skipped on a developer machine, but under CI
(`CI=true`, or `KVTIER_REQUIRE_ALL=1`) any skip other than "needs a GPU" fails the run: CI
installs everything, so such a skip means a broken install hiding untested features.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from servers import MooncakeMaster, RedisServer, ServerUnavailable  # noqa: E402

_Server = TypeVar("_Server", RedisServer, MooncakeMaster)


def _started(module: str, server: type[_Server]) -> _Server:
    """server.start(), skipping the test when its client module or binary is missing."""
    pytest.importorskip(module)
    try:
        return server.start()
    except ServerUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server per test (starts in well under a second), killed afterwards."""
    srv = _started("redis", RedisServer)
    yield srv
    srv.stop()


@pytest.fixture
def mooncake_master() -> Iterator[MooncakeMaster]:
    """A fresh mooncake_master per test, every listener on loopback."""
    srv = _started("mooncake.store", MooncakeMaster)
    yield srv
    srv.stop()


# Skips that are expected on this CPU machine: GPU-only tests and parameter cases that do not
# apply to an adapter. Anything else skipped under CI is a missing dependency.
_EXPECTED_SKIP = re.compile(r"CUDA|GPU|gpu|whole pages")


def _strict() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("KVTIER_REQUIRE_ALL") == "1"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _strict():
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    unexpected = []
    for rep in reporter.stats.get("skipped", []):
        reason = str(rep.longrepr[2]) if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        if not _EXPECTED_SKIP.search(reason):
            unexpected.append(f"{rep.nodeid}: {reason}")
    if unexpected:
        reporter.write_line("skipped for a missing dependency under CI (install it):", red=True)
        for line in unexpected:
            reporter.write_line(f"  {line}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
