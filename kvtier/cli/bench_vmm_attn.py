"""SDPA decode over elastic layer-first KV against a static tensor (rows of `kvtier bench vmm`).

Correctness is checked in two separate ways, because they fail for different reasons:

- KV bytes: the elastic view must hold exactly the static tensor's bytes, compared bit-for-bit
  (as integers) right after the copy and again after the timing loop. A difference is a data
  bug (a page not mapped where the view thinks, the zero page aliased, a copy that did not
  land); the row names the first (layer, K/V, block) triples that differ and where the pool
  placed them.
- attention outputs: recent torch prefers cuDNN SDPA on sm90/sm100, which torch itself flags as
  not deterministic, so two runs over the *same* bytes need not agree bit-for-bit. Outputs are
  compared with a bf16 tolerance, next to each backend's static-vs-static rerun difference.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from kvtier.cli.bench_vmm import Row, row
from kvtier.cli.bench_vmm_gpu import wall
from kvtier.geometry import KVGeometry
from kvtier.memory.elastic import ElasticPool
from kvtier.memory.elastic_check import describe_block
from kvtier.memory.elastic_layout import ElasticLayout
from kvtier.memory.elastic_torch import cross_layer_tensor

# Allowed |elastic - static| relative to max|out|: a few bf16 ulps (2**-7 relative) at the
# largest output, enough for a different fp32 summation order, far below a wrong KV block.
ATTN_TOL = 2.0**-6
_RAW = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}  # same-size integer views


Hit = tuple[int, int, int]  # (layer, kv, block)


def kv_mismatch(elastic: Any, static: Any, limit: int = 8) -> tuple[int, list[Hit]]:
    """Compare two `[L][kv][blocks][page][H][D]` tensors bit-for-bit. Returns the number of
    (layer, kv, block) triples whose bytes differ and the first `limit` of them."""
    import torch

    if elastic.shape != static.shape or elastic.dtype != static.dtype:
        raise ValueError(f"shapes differ: {tuple(elastic.shape)} vs {tuple(static.shape)}")
    raw = getattr(torch, _RAW[elastic.element_size()])
    count, first = 0, []  # type: tuple[int, list[Hit]]
    for layer in range(elastic.shape[0]):  # one layer at a time keeps the mask small
        a, b = elastic[layer].view(raw), static[layer].view(raw)
        bad = (a != b).flatten(2).any(-1)  # [kv][blocks]
        n = int(bad.sum())
        if n and len(first) < limit:
            hits = bad.nonzero()[: limit - len(first)].tolist()
            first += [(layer, int(kv), int(blk)) for kv, blk in hits]
        count += n
    return count, first


def mismatch_report(pool: ElasticPool | None, elastic: Any, static: Any,
                    hits: list[Hit], kv_factor: int = 2) -> str:
    """One line per differing (layer, kv, block): the largest difference, whether the elastic
    block reads as zeros, and (with a pool) where the pool placed the block."""
    lines = []
    for layer, kv, blk in hits:
        e, s = elastic[layer, kv, blk].float(), static[layer, kv, blk].float()
        diff = float((e - s).abs().max())
        zeros = int(e.count_nonzero()) == 0
        where = ""
        if pool is not None:
            d = describe_block(pool, blk, region=layer * kv_factor + kv)
            where = (f" slot {d['slot']} dev {d['device']} page +{d['page_offset']:#x}"
                     f" (+{d['offset_in_page']:#x}) mapped={d['mapped']}"
                     f" allocated={d['allocated']}")
        lines.append(f"layer {layer} {'KV'[kv] if kv < 2 else kv} block {blk}: max diff "
                     f"{diff:.4g}, elastic block all zero={zeros}{where}")
    return "; ".join(lines)


def max_abs_diff(a: Any, b: Any) -> float:
    return float((a.float() - b.float()).abs().max())


def _backends() -> list[tuple[str, Callable[[], AbstractContextManager[Any]]]]:
    """(name, context) for the default choice and each SDPA backend torch offers here."""
    out: list[tuple[str, Callable[[], AbstractContextManager[Any]]]] = [("default", nullcontext)]
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return out
    def pinned(backend: Any) -> Callable[[], AbstractContextManager[Any]]:
        return lambda: sdpa_kernel([backend])

    for name in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
        b = getattr(SDPBackend, name, None)
        if b is not None:
            out.append((name.lower(), pinned(b)))
    return out


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attention_rows(be: Any, seqs: int, tokens: int, device: str = "cuda:0") -> Iterator[Row]:
    """Decode SDPA over paged layer-first KV: elastic view vs a static tensor, same block
    table (shuffled, as after hours of serving), timed interleaved. Raises at the end (after
    every row was yielded) when the KV bytes or the default backend's outputs differ."""
    import torch
    import torch.nn.functional as F

    dev = torch.device(device)
    geo = KVGeometry(4, 8, 128, 16, "bfloat16")
    nblk = tokens // geo.page_size
    lay = ElasticLayout.layer_first(geo, seqs * nblk)
    pool = ElasticPool(be, lay, dev.index or 0, reserve_slots=0)
    errors: list[str] = []
    note = f"{seqs} seqs x {tokens} tokens, 4 layers, GQA 32/8, bf16"
    try:
        elastic = cross_layer_tensor(pool, geo)
        if elastic.device != dev:
            raise RuntimeError(f"elastic view is on {elastic.device}, not {dev}")
        if int(elastic.count_nonzero()) != 0:
            raise RuntimeError("unbacked elastic KV does not read as zeros")
        blocks = pool.alloc(seqs * nblk)
        gen = torch.Generator(device=dev).manual_seed(0)
        perm = torch.randperm(len(blocks), device=dev, generator=gen)
        table = torch.tensor(blocks, device=dev)[perm].view(seqs, nblk)
        static = torch.randn(elastic.shape, device=dev, generator=gen).to(torch.bfloat16)
        elastic.copy_(static)
        _sync(dev)
        q = torch.randn(seqs, 32, 1, 128, device=dev, generator=gen).to(torch.bfloat16)

        def check_bytes(when: str) -> Row:
            n, hits = kv_mismatch(elastic, static)
            if n:
                diag = mismatch_report(pool, elastic, static, hits)
                errors.append(f"KV bytes differ {when}: {n} blocks; {diag}")
                return row(f"KV bytes elastic == static ({when})", n, "blocks", "0", False,
                           diag[:1500])
            return row(f"KV bytes elastic == static ({when})", 0, "blocks", "0", True,
                       "bit-for-bit, every layer/K/V/block")

        yield check_bytes("after copy")

        def attend(cache: Any) -> Any:
            out = []
            for layer in range(geo.num_layers):
                k = cache[layer, 0][table].view(seqs, tokens, 8, 128).transpose(1, 2)
                v = cache[layer, 1][table].view(seqs, tokens, 8, 128).transpose(1, 2)
                out.append(F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
            return torch.stack(out)

        for name, ctx in _backends():
            try:
                with ctx():
                    ref, again, got = attend(static), attend(static), attend(elastic)
            except RuntimeError as exc:  # the backend does not take these inputs
                yield row(f"SDPA {name}: max |elastic - static|", None, "", "", None,
                          f"not available: {str(exc).splitlines()[0][:160]}")
                continue
            diff, rerun = max_abs_diff(got, ref), max_abs_diff(again, ref)
            tol = ATTN_TOL * float(ref.float().abs().max())
            ok = diff <= tol
            if name == "default" and not ok:
                errors.append(f"attention over elastic KV differs from the static tensor: max "
                              f"|diff| {diff:.4g} > {tol:.4g} (static rerun diff {rerun:.4g})")
            yield row(f"SDPA {name}: max |elastic - static|", diff, "abs", f"<= {tol:.2g}", ok,
                      f"static rerun diff {rerun:.3g}; elastic bitwise equal: "
                      f"{bool(torch.equal(got, ref))}")

        times: dict[str, list[float]] = {"static": [], "elastic": []}
        for _ in range(15):
            for name, cache in (("static", static), ("elastic", elastic)):
                times[name].append(wall(lambda c=cache: attend(c), 3))
        t_s, t_e = statistics.median(times["static"]), statistics.median(times["elastic"])
        ratio = t_e / t_s
        yield row("SDPA decode over static KV", t_s * 1e3, "ms", "-", None, note)
        yield row("SDPA decode over elastic KV", t_e * 1e3, "ms", "-", None, note)
        yield row("elastic / static attention time", 100 * ratio, "%", "<= 102", ratio <= 1.02)
        yield check_bytes("after timing")
        pool.free(blocks)
        pool.check_integrity()
        _sync(dev)
        if pool.mapped_bytes() or int(elastic.count_nonzero()) != 0:
            errors.append("released elastic KV pages do not read as zeros")
    finally:
        pool.close()
    if errors:
        raise RuntimeError(" | ".join(errors))
