"""Fixtures for the tier tests: real servers on loopback ports (skipped when not installed).

tests/servers.py is importable from every test folder once this conftest has run (it puts the
tests/ directory on sys.path; pytest's default import mode only adds each test's own folder).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from servers import MooncakeMaster, RedisServer, ServerUnavailable  # noqa: E402


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server per test (starts in well under a second), killed afterwards."""
    try:
        srv = RedisServer.start()
    except ServerUnavailable as exc:
        pytest.skip(str(exc))
    yield srv
    srv.stop()


@pytest.fixture
def mooncake_master() -> Iterator[MooncakeMaster]:
    """A fresh mooncake_master per test, every listener on loopback."""
    try:
        srv = MooncakeMaster.start()
    except ServerUnavailable as exc:
        pytest.skip(str(exc))
    yield srv
    srv.stop()
