"""Write the policy-benchmark traces as one-key-per-line files for `kvtier sim`.

    python bench/traces.py --out /tmp/traces --accesses 200000 --seed 1

writes scan.txt, chat.txt and zipf.txt (see kvtier/cli/tracegen.py for what each models) and
prints, per trace, its size and the capacities `kvtier bench policy` compares policies at, e.g.

    kvtier sim --policy s3fifo --capacity 5000 --trace /tmp/traces/scan.txt --json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from kvtier.cli.tracegen import TRACES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the trace files")
    parser.add_argument("--accesses", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", choices=sorted(TRACES), action="append")
    args = parser.parse_args(argv)
    if args.accesses <= 0:
        parser.error("--accesses must be positive")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only or list(TRACES):
        spec = TRACES[name]
        t0 = time.perf_counter()
        keys = spec.generate(args.accesses, args.seed)
        path = args.out / f"{name}.txt"
        path.write_text("\n".join(keys) + "\n", encoding="utf-8")
        caps = ",".join(map(str, spec.capacities))
        print(
            f"{path}: {len(keys)} accesses, {len(set(keys))} distinct keys, capacities {caps}, "
            f"{time.perf_counter() - t0:.2f}s - {spec.description}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
