"""`kvtier bench ttft`: time to first token with a cached prompt prefix.

A Llama-3-8B-shaped model with random weights (they compute exactly as trained ones do) gets a
long prompt whose first pages are in kvtier. Measured in one run, on one device:

  recompute      prefill of the whole prompt
  host           prefix loaded from kvtier's (pinned) host tier, layer by layer, overlapped
  disk           prefix promoted from the disk tier (page cache dropped first), then loaded
  slow disk      a throttled disk tier: the cost model sees loading lose and recomputes
  floor          cached bytes / pinned H2D bandwidth + prefill of the uncached tokens alone

`--preset tiny` (the default without CUDA) runs the same steps on a tiny model on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from kvtier.tiers.base import Item
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.options import Options
from kvtier.tiers.registry import register_tier
from kvtier.tiers.slabs import open_slab_dir

PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      vocab_size=128256, rope_theta=500000.0, tokens=32768, cached=32256,
                      slow_mbps=200.0),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=256,
                 rope_theta=10000.0, tokens=512, cached=448, slow_mbps=0.1),
}  # fmt: skip


class ThrottledDiskTier(DiskTier):
    """The disk tier, read no faster than `read_bytes_per_s` (a slow or shared device)."""

    read_bytes_per_s = 50e6

    def _load_batch(self, items: Sequence[Item]) -> list[bool]:
        start = time.perf_counter()
        out = super()._load_batch(items)
        need = len(items) * self.ctx.blob_bytes / self.read_bytes_per_s
        time.sleep(max(0.0, need - (time.perf_counter() - start)))
        return out


@register_tier("throttled-disk")
def _make_throttled(name: str, options: Any, ctx: Any) -> DiskTier:
    opts = dict(options)
    rate = float(opts.pop("read_bytes_per_s", 50e6))
    o = Options(name, opts)
    path, budget = o.string("path"), o.size("budget", "8GiB", minimum=ctx.blob_bytes)
    o.finish()
    tier = ThrottledDiskTier(name, ctx, open_slab_dir(name, path, ctx, budget, 1 << 30))
    tier.read_bytes_per_s = rate
    return tier


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default=None)
    p.add_argument("--tokens", type=int, default=None, help="prompt length")
    p.add_argument("--cached", type=int, default=None, help="prefix tokens in kvtier")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--disk-path", default=None, help="directory for the disk tier")
    p.add_argument("--slow-read-mbps", type=float, default=None, help="throttled tier, MB/s")
    p.add_argument("--out", default=None, help="write results as JSON here")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(dev: torch.device, fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    _sync(dev)
    t0 = time.perf_counter()
    out = fn(*args)
    _sync(dev)
    return time.perf_counter() - t0, out


def _h2d_bandwidth(dev: torch.device, nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=dev.type == "cuda")
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst.copy_(src, non_blocking=True)
    times = [_timed(dev, lambda: dst.copy_(src, non_blocking=True))[0] for _ in range(3)]
    return nbytes / min(times)


def _drop_page_cache(root: Path) -> None:
    os.sync()
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class _Recorder:
    """Results and errors, written to `path` after every step so a run cut short (a fault, a
    time limit) still leaves what it measured. A failing step is recorded and the next one runs."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self.results: dict[str, Any] = {"errors": []}

    def save(self) -> None:
        if self.path is not None:
            self.path.write_text(json.dumps(self.results, indent=2))

    def error(self, msg: str) -> None:
        self.results["errors"].append(msg)
        print("ERROR:", msg, flush=True)
        self.save()

    def step(self, name: str, fn: Callable[[], None]) -> bool:
        try:
            fn()
        except Exception as exc:  # record it and go on: later cases are still worth measuring
            traceback.print_exc()
            self.error(f"{name}: {type(exc).__name__}: {exc}")
            return False
        self.save()
        return True


def run(args: argparse.Namespace) -> int:
    import transformers

    from kvtier.cache import TieredCache
    from kvtier.integrations.transformers import KVTierCache, namespace_for
    from kvtier.integrations.transformers.cost import CostModel

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = dict(PRESETS[args.preset or ("llama3-8b" if dev.type == "cuda" else "tiny")])
    n_tok = args.tokens or preset.pop("tokens")
    cached = args.cached or preset.pop("cached")
    slow_mbps = args.slow_read_mbps or preset.pop("slow_mbps")
    preset.pop("tokens", None), preset.pop("cached", None), preset.pop("slow_mbps", None)
    s = args.page_size
    if cached % s or not 0 < cached < n_tok:
        print(f"--cached must be a positive multiple of {s} below --tokens")
        return 2
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = transformers.LlamaConfig(max_position_embeddings=max(n_tok, 4096), **preset)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with dev:
        model = transformers.LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(prev)
    ids = torch.randint(0, cfg.vocab_size, (1, n_tok), device=dev)
    ns = namespace_for(cfg, s, dtype, model_id=f"bench-ttft-{args.preset or 'auto'}")
    g = ns.geometry
    cached_bytes = cached // s * g.page_bytes
    rec = _Recorder(args.out)
    r = rec.results
    r.update(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
             transformers=transformers.__version__, torch=torch.__version__, tokens=n_tok,
             cached=cached, cached_bytes=cached_bytes)  # fmt: skip
    rec.save()

    def prefill(cache: Any, start: int) -> torch.Tensor:
        pos = torch.arange(start, ids.shape[1], device=dev)
        with torch.no_grad():
            out = model(input_ids=ids[:, start:], past_key_values=cache, cache_position=pos,
                        use_cache=True, logits_to_keep=1)  # fmt: skip
        return out.logits[0, -1].float()

    def first_token(c: Any, cost: Any = None) -> torch.Tensor:
        c.attach(ids, cost=cost)
        return prefill(c, c.hit_tokens)

    def full(n: int) -> torch.Tensor:
        with torch.no_grad():
            c = transformers.DynamicCache(config=cfg)
            return model(input_ids=ids[:, :n], past_key_values=c, logits_to_keep=1).logits

    ref: list[torch.Tensor] = []

    def check(name: str, logits: torch.Tensor) -> None:
        if not ref:
            return
        cos = torch.nn.functional.cosine_similarity(logits, ref[0], dim=0).item()
        r[f"{name}_cosine_vs_recompute"] = cos
        if cos < 0.99 or not torch.isfinite(logits).all():
            rec.error(f"{name}: logits differ from recompute (cosine {cos:.4f})")

    def baselines() -> None:
        full(min(512, n_tok))  # warm-up
        runs = [_timed(dev, lambda: prefill(transformers.DynamicCache(config=cfg), 0))
                for _ in range(args.repeats)]  # fmt: skip
        ref.append(runs[0][1])
        r["recompute_s"] = statistics.median(t for t, _ in runs)
        r["suffix_alone_s"] = statistics.median(
            _timed(dev, lambda: full(n_tok - cached))[0] for _ in range(3)
        )
        bw = _h2d_bandwidth(dev, min(cached_bytes, 1 << 30))
        r.update(h2d_gbps=bw / 1e9, floor_s=cached_bytes / bw + r["suffix_alone_s"])
        _row("recompute", r["recompute_s"], r)
        _row("floor", r["floor_s"], r)

    print(f"{'case':<24}{'TTFT s':>10}{'x recompute':>14}{'/ floor':>10}", flush=True)
    if not rec.step("recompute and floor", baselines):
        _report(r)
        return 1

    tmp = Path(args.disk_path or tempfile.mkdtemp(prefix="kvtier-ttft-"))
    budget = cached_bytes * 1.1 + (64 << 20)
    conf = {"host": {"budget": int(budget)}, "promotion": {"max_pages": 1 << 16},
            "tiers": [{"kind": "disk", "path": str(tmp), "budget": int(budget)}]}  # fmt: skip

    def measure(name: str, tiered: Any, cost: Any = None, **kw: Any) -> KVTierCache:
        c = KVTierCache(cfg, tiered, store=False, **kw)
        try:
            t, logits = _timed(dev, first_token, c, cost)
        finally:
            c.close()
        r.setdefault(f"{name}_times_s", []).append(t)
        r[f"{name}_s"] = statistics.median(r[f"{name}_times_s"])
        r[f"{name}_loaded_tokens"] = c.hit_tokens
        check(name, logits)
        return c

    def host() -> None:
        with TieredCache(conf, ns) as tiered:
            warm = KVTierCache(cfg, tiered)
            warm.attach(ids[:, :cached])
            prefill(warm, 0)
            warm.flush()
            warm.close()
            r["stored_pages"] = warm.stored_pages
            tiered.drain(timeout=600)
            for _ in range(args.repeats):
                if measure("host", tiered).hit_tokens != cached:
                    rec.error(f"host: hit {r['host_loaded_tokens']} tokens, expected {cached}")
                rec.save()
        _row("host", r["host_s"], r)

    def disk() -> None:
        for _ in range(max(1, min(2, args.repeats))):
            _drop_page_cache(tmp)
            with TieredCache(conf, ns) as fresh:
                if measure("disk", fresh, promote_wait_s=600).hit_tokens != cached:
                    rec.error(f"disk: hit {r['disk_loaded_tokens']} tokens, expected {cached}")
                rec.save()
        _row("disk (cold)", r["disk_s"], r)

    def slow_disk() -> None:
        slow_rate = slow_mbps * 1e6
        # small promotion batches: the lookup's background promotion must not hold up shutdown
        slow_tier = {"kind": "throttled-disk", "path": str(tmp), "budget": int(budget),
                     "read_bytes_per_s": slow_rate}  # fmt: skip
        slow_conf = dict(conf, promotion={"max_pages": 2}, tiers=[slow_tier])
        bw = r["h2d_gbps"] * 1e9
        cost = CostModel(prefill_tokens_per_s=n_tok / r["recompute_s"], h2d_bytes_per_s=bw,
                         tier_bytes_per_s=slow_rate)  # fmt: skip
        r["slow_disk_load_estimate_s"] = cost.load_seconds(cached // s, g.page_bytes,
                                                           in_host=False)  # fmt: skip
        with TieredCache(slow_conf, ns) as slow:
            c = measure("slow_disk", slow, cost)
        if c.hit_tokens or not c.skipped_tokens:
            rec.error("slow disk: the cost model did not choose to recompute")
        _row("slow disk, cost-aware", r["slow_disk_s"], r)

    for name, fn in (("host", host), ("disk", disk), ("slow disk", slow_disk)):
        rec.step(name, fn)
    if "host_s" in r:
        r.update(speedup_host=r["recompute_s"] / r["host_s"],
                 host_vs_floor=r["host_s"] / r["floor_s"])  # fmt: skip
    rec.save()
    _report(r)
    return 1 if r["errors"] else 0


def _row(name: str, t: float, r: dict[str, Any]) -> None:
    print(f"{name:<24}{t:>10.4f}{r['recompute_s'] / t:>14.2f}{t / r['floor_s']:>10.2f}",
          flush=True)  # fmt: skip


def _report(r: dict[str, Any]) -> None:
    """The summary table, last (from whatever was measured)."""
    print(f"kvtier bench ttft  device={r.get('device')}  prompt={r.get('tokens')}  "
          f"cached={r.get('cached')}  ({r.get('cached_bytes', 0) / 1e9:.2f} GB, "
          f"H2D {r.get('h2d_gbps', 0):.1f} GB/s)")  # fmt: skip
    print(f"{'case':<24}{'TTFT s':>10}{'x recompute':>14}{'/ floor':>10}")
    cases = [("recompute", "recompute_s"), ("floor", "floor_s"), ("host", "host_s"),
             ("disk (cold)", "disk_s"), ("slow disk, cost-aware", "slow_disk_s")]  # fmt: skip
    for name, key in cases:
        if key not in r:
            print(f"{name:<24}{'not measured':>10}")
        elif "floor_s" in r:
            _row(name, r[key], r)
    if "speedup_host" in r:
        fast = "MET" if r["speedup_host"] >= 10 else "MISSED"
        near = "MET" if r["host_vs_floor"] <= 1.25 else "MISSED"
        print(f"goals: host >= 10x recompute: {fast} ({r['speedup_host']:.1f}x); "
              f"host <= 1.25x floor: {near} ({r['host_vs_floor']:.2f}x)")  # fmt: skip
    for e in r["errors"]:
        print("ERROR:", e)
