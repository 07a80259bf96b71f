"""Threshold sweep of the copy engine: Triton kernel vs batched DMA by item size and count.

For each item size (one contiguous run: one block of one layer's K or V) and two job sizes
(a large job of ~256 MiB and a small one of at most SMALL_ITEMS items), time store and load on
each Triton tile configuration and on batched DMA; the fastest Triton tile is kept, and the
crossover (smallest item size from which DMA wins by > 2 % at every larger size) becomes the
threshold. Writes $OUT/transfer-sweep.json and $OUT/thresholds.json (the file to commit as
kvtier/transfer/thresholds.json). Every configuration is checked bit for bit once.

usage: python bench/device/transfer_sweep.py OUT_DIR
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from kvtier.geometry.spec import KVGeometry
from kvtier.memory.host_pool import HostPool
from kvtier.transfer.device_kv import DeviceKV
from kvtier.transfer.gpu_paths import GPUPaths
from kvtier.transfer.thresholds import Thresholds
from kvtier.transfer.torch_path import host_planes

ITEM_SIZES = [2048, 4096, 8192, 16384, 32768, 65536, 131072]
TILES = [(8192, 4), (32768, 8)]  # (bytes per program, warps)
LARGE_BYTES = 256 << 20
SMALL_ITEMS = 512
LAYERS = 8


def _timed(fn, reps: int = 5) -> float:  # type: ignore[no-untyped-def]
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure(item: int, total_items: int) -> dict[str, object]:
    # one head of D = item / 32 bf16 elements, 16-token pages: one item per (page, plane)
    g = KVGeometry(LAYERS, 1, item // 32, 16, "bfloat16")
    pages = max(1, total_items // (2 * LAYERS))
    nb = pages + 8
    layers = [
        torch.empty((2, nb, 16, 1, g.head_size), dtype=torch.int16, device="cuda")
        for _ in range(LAYERS)
    ]
    for t in layers:
        t.view(torch.uint8).random_(0, 256)
    dkv = DeviceKV.from_vllm(layers, g, 16)
    pool = HostPool(pages, g.page_bytes, pin=True)
    host = host_planes(pool, dkv)
    blocks = torch.randperm(nb)[:pages].view(-1, 1)
    slots = torch.randperm(pages)
    planes = list(range(dkv.num_planes))
    nbytes = pages * g.page_bytes
    stream = torch.cuda.Stream()
    out: dict[str, object] = {"item_bytes": item, "items": pages * dkv.num_planes, "bytes": nbytes}
    idx = blocks.reshape(-1).to("cuda")

    def device_blobs() -> torch.Tensor:
        parts = [p.index_select(0, idx) for p in dkv.planes]
        return torch.stack(parts, dim=1).reshape(pages, -1).view(torch.uint8).cpu()

    ref = device_blobs()

    def check(label: str) -> None:
        torch.cuda.synchronize()
        if not torch.equal(pool.payloads()[slots], ref):
            raise AssertionError(f"item {item}: {label} differs from the torch reference")
        if not torch.equal(device_blobs(), ref):
            raise AssertionError(f"item {item}: {label} changed the device pages wrongly")

    for op in ("store", "load"):
        rates: dict[str, float] = {}
        runs: list[tuple[str, GPUPaths, str]] = []
        for tile, warps in TILES:
            th = Thresholds.from_dict({"triton": {"block_bytes": tile, "num_warps": warps}})
            runs.append((f"triton/{tile}/{warps}", GPUPaths(dkv, pool, th), "triton"))
        dma_paths = GPUPaths(dkv, pool, Thresholds.from_dict({}))
        if dma_paths.dma is not None:
            runs.append(("dma", dma_paths, "dma"))
        for label, gp, path in runs:
            if op == "store":
                pool.payloads().fill_(0)
            else:
                for p in dkv.planes:
                    p[idx] = 0

            def once(gp: GPUPaths = gp, path: str = path, op: str = op) -> None:
                gp.run(op, path, blocks, slots, planes, host)

            with torch.cuda.stream(stream):
                t = _timed(once)
            rates[label] = nbytes / t / 1e9
            check(f"{op} via {label}")
        out[op] = rates
    return out


def crossover(rows: list[dict], op: str) -> int | None:
    """Smallest item size from which DMA beats the best Triton tile by > 2 % at every size."""
    best: int | None = None
    for row in reversed(rows):
        rates = row[op]
        tri = max(v for k, v in rates.items() if k.startswith("triton"))
        if rates.get("dma", 0.0) > 1.02 * tri:
            best = row["item_bytes"]
        else:
            break
    return best


def best_tile(rows: list[dict]) -> tuple[int, int]:
    score: dict[str, float] = {}
    for row in rows:
        for op in ("store", "load"):
            for k, v in row[op].items():
                if k.startswith("triton"):
                    score[k] = score.get(k, 0.0) + v
    _, tile, warps = max(score, key=score.__getitem__).split("/")
    return int(tile), int(warps)


def main(out_dir: str) -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    large: list[dict] = []
    small: list[dict] = []
    for size in ITEM_SIZES:  # partial results are kept if the run is cut short
        large.append(measure(size, LARGE_BYTES // size))
        small.append(measure(size, SMALL_ITEMS))
        (out / "transfer-sweep.json").write_text(json.dumps({"large": large, "small": small}))
    tile, warps = best_tile(large)
    thresholds = {
        "measured": True,
        "device": torch.cuda.get_device_name(),
        "date": datetime.now(UTC).date().isoformat(),
        "note": "written by bench/device/transfer_sweep.py",
        "triton": {"block_bytes": tile, "num_warps": warps},
        "store": [
            {"max_items": SMALL_ITEMS, "dma_min_item_bytes": crossover(small, "store")},
            {"max_items": None, "dma_min_item_bytes": crossover(large, "store")},
        ],
        "load": [
            {"max_items": SMALL_ITEMS, "dma_min_item_bytes": crossover(small, "load")},
            {"max_items": None, "dma_min_item_bytes": crossover(large, "load")},
        ],
    }
    (out / "transfer-sweep.json").write_text(json.dumps({"large": large, "small": small}, indent=2))
    (out / "thresholds.json").write_text(json.dumps(thresholds, indent=2) + "\n")
    print(f"{'item':>8} {'job':>6} {'op':>6} {'best triton':>12} {'dma':>8}  GB/s")
    for label, rows in (("large", large), ("small", small)):
        for row in rows:
            for op in ("store", "load"):
                r = row[op]
                tri = max(v for k, v in r.items() if k.startswith("triton"))
                print(
                    f"{row['item_bytes']:>8} {label:>6} {op:>6} {tri:12.2f} "
                    f"{r.get('dma', float('nan')):8.2f}"
                )
    print(
        "thresholds:",
        json.dumps(thresholds["store"]),
        json.dumps(thresholds["load"]),
        "tile",
        tile,
        "warps",
        warps,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
