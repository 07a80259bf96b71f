"""Byte sizes as people write them: 1024, 512M, 8G, 1.5GiB, 100MB (binary multiples throughout,
as memory is counted)."""

from __future__ import annotations

import re

from kvtier.errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 1 << 30,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tb": 1 << 40,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object, field: str = "size") -> int:
    """Parse a size into bytes; raise ConfigError naming `field` on anything else."""
    if isinstance(value, bool):
        raise ConfigError(field, value, "a size such as 1024, 512M, 8G or 1.5GiB")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(field, value, "a non-negative size")
        return value
    match = _SIZE.match(str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(field, value, "a size such as 1024, 512M, 8G or 1.5GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(n: int) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n}B"
