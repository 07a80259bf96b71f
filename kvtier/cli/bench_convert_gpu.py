"""GPU layout-conversion measurements for `kvtier bench transfer`.

A conversion reads and writes the whole pool once, so its ceiling is a device-to-device copy of
the same bytes (`Ceilings.fns["device_copy"]`). Both are timed the same way: `BURST` launches
back to back between two synchronizes, so the host's launch cost (tens of microseconds for a
Triton launch, against ~0.3 ms of kernel for a 1 GiB pool) overlaps the kernels, as it does in an
engine that converts while other work is queued. Each timed burst pairs with a burst of the
device copy, and the ratio is the median of the per-pair ratios (bench_transfer_gpu.paired).
Every Triton configuration is checked bit for bit against the torch path once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvtier.cli.bench_transfer_gpu import Ceilings, paired
from kvtier.geometry.layouts import parse_layout, shape
from kvtier.geometry.spec import KVGeometry
from kvtier.transfer.convert import convert_layout
from kvtier.transfer.torch_path import move_dtype

CONVERSIONS = [
    ("layer_first", "page_first"),
    ("page_first", "layer_first"),
    ("page_first", "page_head"),
    ("layer_first", "page_first_direct"),
]
BURST = 8
# (bytes per program, warps) of the Triton kernel tried by --sweep-convert; the first is the
# committed default (kvtier.transfer.convert)
TILES = ((8192, 4), (16384, 4), (16384, 8), (32768, 8))


def _burst(fn: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        for _ in range(BURST):
            fn()

    return run


def conversion_rates(
    g: KVGeometry, pages: int, ceil: Ceilings, reps: int, sweep: bool = False
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """({conversion: {config: GB/s}}, {conversion: {config: paired ratio to device copy}}) of
    whole-pool layout conversion: the Triton kernel (each of TILES when `sweep`, else the
    default) and torch. GB/s counts bytes read + written. Raises AssertionError when a Triton
    result differs from torch's, ValueError when the pool is not the ceiling's size."""
    rates: dict[str, dict[str, float]] = {}
    ratios: dict[str, dict[str, float]] = {}
    for frm_name, to_name in CONVERSIONS:
        key = f"{frm_name}->{to_name}"
        rates[key], ratios[key] = _one(g, frm_name, to_name, pages, ceil, reps, sweep)
    return rates, ratios


def _one(
    g: KVGeometry, frm_name: str, to_name: str, pages: int, ceil: Ceilings, reps: int, sweep: bool
) -> tuple[dict[str, float], dict[str, float]]:
    copy, copy_bytes = ceil.fns["device_copy"]
    move = move_dtype(g.itemsize)
    frm, to = parse_layout(frm_name), parse_layout(to_name)
    src = torch.empty(shape(frm, g, pages), dtype=move, device="cuda")
    src.view(torch.uint8).random_(0, 256)
    dst = torch.empty(shape(to, g, pages), dtype=move, device="cuda")
    nbytes = 2 * src.numel() * src.element_size()
    if nbytes != copy_bytes:
        raise ValueError(f"pool of {nbytes // 2} bytes, ceiling of {copy_bytes // 2}")
    ref = convert_layout(src, frm, to, g, path="torch")

    def triton(tile: int, warps: int) -> Callable[[], object]:
        return lambda: convert_layout(
            src, frm, to, g, out=dst, path="triton", tile_bytes=tile, num_warps=warps
        )

    configs: dict[str, Callable[[], object]] = {}
    for tile, warps in TILES if sweep else TILES[:1]:
        name = "triton" if (tile, warps) == TILES[0] else f"triton {tile // 1024}K w{warps}"
        configs[name] = triton(tile, warps)
    # the torch path allocates its result, as its callers do
    configs["torch"] = lambda: convert_layout(src, frm, to, g, path="torch")
    rates, ratios = {}, {}
    for name, fn in configs.items():
        if name != "torch":
            dst.fill_(-1)
            fn()
            if not torch.equal(dst.view(torch.uint8), ref.view(torch.uint8)):
                raise AssertionError(f"conversion {frm_name}->{to_name} ({name}) differs")
        t, ratio = paired(_burst(fn), _burst(copy), reps)
        rates[name] = BURST * nbytes / t / 1e9
        ratios[name] = ratio
    return rates, ratios
