"""Loopback redis-server / mooncake_master launchers for tests in every folder (see
kvtier/cli/servers.py: it imports nothing else from kvtier, so it is safe to use from tests)."""

from kvtier.cli.servers import (
    MooncakeMaster,
    RedisServer,
    ServerUnavailable,
    free_port,
    listening_addresses,
    mooncake_master_binary,
    wait_port,
)

__all__ = [
    "MooncakeMaster",
    "RedisServer",
    "ServerUnavailable",
    "free_port",
    "listening_addresses",
    "mooncake_master_binary",
    "wait_port",
]
