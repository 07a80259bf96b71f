"""kvtier layouts on CUDA: bit-exact against the CPU, and gather/scatter bandwidth vs device copy.

Run from the repository root on a CUDA machine:

    python bench/device/layouts_gpu.py            # writes $OUT/layouts_gpu.json (or ./)

Part 1 checks, for bf16/fp16/fp32/fp8 and all 16 ordered layout pairs, that convert,
to_canonical and from_canonical give the same bits on the GPU as on the CPU (exit code 1 on any
mismatch). Part 2 times, for the llama3-8b geometry (2 MiB pages), gathering 512 random pages of a
2048-page pool in each layout into canonical blobs (to_canonical) and scattering them back
(from_canonical), and reports GB/s as a ratio to a plain device-to-device copy of the same bytes
measured in the same run (the HBM ceiling for a read+write of those bytes).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kvtier.geometry import (
    KVGeometry,
    Layout,
    convert,
    from_canonical,
    preset,
    shape,
    to_canonical,
    torch_dtype,
)

INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT[t.element_size()]).cpu()


def check_exact() -> int:
    failures = 0
    for dtype in ("bfloat16", "float16", "float32", "float8_e4m3fn"):
        for g in (KVGeometry(3, 5, 16, 7, dtype), KVGeometry(2, 1, 24, 3, dtype, mla=True)):
            pages = [5, 0, 3, 2]
            gen = torch.Generator().manual_seed(7)
            raw = torch.randint(0, 256, (6 * g.page_bytes,), dtype=torch.uint8, generator=gen)
            for src, dst in itertools.product(Layout, Layout):
                cpu = raw.view(torch_dtype(g.dtype)).view(shape(src, g, 6))
                gpu = cpu.cuda()
                ok = torch.equal(bits(convert(gpu, src, dst, g)), bits(convert(cpu, src, dst, g)))
                idx = torch.tensor(pages, device="cuda")
                blobs = to_canonical(gpu, src, g, idx)
                ok &= torch.equal(bits(blobs), bits(to_canonical(cpu, src, g, pages)))
                target = torch.zeros_like(gpu)
                from_canonical(blobs, target, src, g, idx)
                ok &= torch.equal(bits(to_canonical(target, src, g, pages)), bits(blobs))
                if not ok:
                    failures += 1
                    print(f"MISMATCH dtype={dtype} mla={g.mla} {src.value}->{dst.value}")
    return failures


def timed(fn: object, reps: int = 10) -> float:
    assert callable(fn)
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def copy_seconds(nbytes: int) -> float:
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return timed(lambda: b.copy_(a))


def bandwidth() -> list[dict[str, object]]:
    g = preset("llama3-8b")
    num_pages, n = 2048, 512
    idx = torch.randperm(num_pages, device="cuda")[:n]
    nbytes = n * g.page_bytes
    ceiling = nbytes / copy_seconds(nbytes)
    rows: list[dict[str, object]] = []
    for layout in Layout:
        pool = torch.randn(shape(layout, g, num_pages), device="cuda").to(torch.bfloat16)
        blobs = to_canonical(pool, layout, g, idx)
        gather = nbytes / timed(lambda p=pool, lay=layout: to_canonical(p, lay, g, idx))
        scatter = nbytes / timed(
            lambda p=pool, lay=layout, bl=blobs: from_canonical(bl, p, lay, g, idx)
        )
        check = to_canonical(pool, layout, g, idx)
        if not torch.equal(bits(check), bits(blobs)):
            raise SystemExit(f"scatter/gather mismatch in {layout.value}")
        rows.append(
            {
                "layout": layout.value,
                "gather_GBps": gather / 1e9,
                "scatter_GBps": scatter / 1e9,
                "gather_ratio": gather / ceiling,
                "scatter_ratio": scatter / ceiling,
                "ceiling_copy_GBps": ceiling / 1e9,
            }
        )
        del pool, blobs, check
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    if not torch.cuda.is_available():
        print("CUDA is not available")
        return 1
    failures = check_exact()
    rows = bandwidth()
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "exact_failures": failures,
        "rows": rows,
    }
    (out / "layouts_gpu.json").write_text(json.dumps(result, indent=2))
    print(f"\n{result['device']}  exactness: {'OK' if failures == 0 else f'{failures} FAILED'}")
    print("llama3-8b, 512 random 2 MiB pages of 2048; ceiling = device copy of the same bytes")
    print(f"{'layout':<18} {'gather GB/s':>12} {'ratio':>6} {'scatter GB/s':>13} {'ratio':>6}")
    for r in rows:
        print(
            f"{r['layout']:<18} {r['gather_GBps']:>12.0f} {r['gather_ratio']:>6.2f} "
            f"{r['scatter_GBps']:>13.0f} {r['scatter_ratio']:>6.2f}"
        )
    print(f"device copy ceiling: {rows[0]['ceiling_copy_GBps']:.0f} GB/s")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
