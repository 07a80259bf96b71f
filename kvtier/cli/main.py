"""The `kvtier` command: a thin dispatcher over one module per subcommand.

Each module listed in COMMANDS exposes `register(subparsers)`, which adds its parser and sets
`func` (called with the parsed namespace, returning an exit code). Modules are imported lazily
so that `kvtier --version` never pays for torch or a server client.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from kvtier import __version__
from kvtier.errors import KVTierError

# subcommand module -> the subcommand names it registers (used to import only what is needed)
COMMANDS: dict[str, tuple[str, ...]] = {
    "kvtier.cli.sim": ("sim",),
    "kvtier.cli.bench": ("bench",),
    "kvtier.cli.segments": ("segments", "limit", "shared", "top"),
    "kvtier.cli.vllm": ("vllm-args", "demo"),
    "kvtier.cli.config": ("config",),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvtier", description="Tiered KV-cache memory.")
    parser.add_argument("--version", action="version", version=f"kvtier {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name, names in COMMANDS.items():
        if only is not None and only not in names:
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # subcommand not part of this build
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in args_list if not a.startswith("-")), None)
    parser = build_parser(
        only=first if first and any(first in n for n in COMMANDS.values()) else None
    )
    args = parser.parse_args(args_list)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except KVTierError as exc:
        print(f"kvtier {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
