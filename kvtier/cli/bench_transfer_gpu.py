"""GPU measurements for `kvtier bench transfer`: ceilings, baselines and the copy engine.

Every figure is bytes moved (host side) over the median wall time of `reps` runs, each run
bracketed by a device synchronize, so Python submit costs are included. Ratios are to the
pinned contiguous memcpy ceiling (one direction, or both at once on two streams) measured in
the same run and, for the copy engine and the baselines, paired: each timed run alternates with
one run of the ceiling copy of the same bytes, and the ratio is the median of the per-pair
ratios, so a machine whose PCIe or memory bandwidth drifts during the run (other tenants) moves
both sides of a ratio together. Correctness is checked once per engine path on the full job: a
wrong byte raises AssertionError. Layout conversion is measured in bench_convert_gpu.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvtier.geometry.spec import KVGeometry
from kvtier.memory.host_pool import HostPool
from kvtier.transfer.device_kv import DeviceKV
from kvtier.transfer.dma import BatchDMA
from kvtier.transfer.engine import CopyEngine
from kvtier.transfer.thresholds import Staged, Thresholds
from kvtier.transfer.torch_path import host_planes, move_dtype


@dataclass
class Setup:
    g: KVGeometry
    pages: int
    layers: list[torch.Tensor]
    dkv: DeviceKV
    pool: HostPool
    blocks_a: torch.Tensor  # [N, 1] blocks stored
    slots_a: torch.Tensor
    blocks_b: torch.Tensor  # [N, 1] blocks loaded (disjoint from blocks_a)
    slots_b: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.pages * self.g.page_bytes


def make_setup(g: KVGeometry, pages: int, seed: int = 0, slots: str = "random") -> Setup:
    """vLLM-style per-layer caches with 2N + 8 blocks of random data, a pinned pool of 2N slots,
    and two disjoint (random blocks, slots) sets of N pages each. `slots`: "random" (a
    fragmented pool: no two consecutive), or "pool" (what HostPool.alloc hands out: a fresh
    pool's ascending runs)."""
    gen = torch.Generator().manual_seed(seed)
    nb = 2 * pages + 8
    dev = torch.device("cuda")
    move = move_dtype(g.itemsize)
    shape = (
        (nb, g.page_size, g.head_size)
        if g.mla
        else (2, nb, g.page_size, g.num_kv_heads, g.head_size)
    )
    layers = []
    for _ in range(g.num_layers):
        t = torch.empty(shape, dtype=move, device=dev)
        t.view(torch.uint8).random_(0, 256)
        layers.append(t)
    dkv = DeviceKV.from_vllm(layers, g, g.page_size)
    pool = HostPool(2 * pages, g.page_bytes, pin=True)
    perm = torch.randperm(nb, generator=gen)
    sperm = torch.randperm(2 * pages, generator=gen)
    if slots == "pool":
        taken = pool.alloc(2 * pages)  # a fresh pool: 0, 1, 2, ... (store a, then load b)
        assert taken is not None
        sperm = torch.tensor(taken)
    elif slots != "random":
        raise ValueError(f"slots: 'random' or 'pool', not {slots!r}")
    return Setup(
        g,
        pages,
        layers,
        dkv,
        pool,
        perm[:pages].view(-1, 1),
        sperm[:pages],
        perm[pages : 2 * pages].view(-1, 1),
        sperm[pages:],
    )


def timed(fn: Callable[[], object], reps: int) -> float:
    """Median seconds of fn() between device synchronizes (after one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        times.append(_once(fn))
    return statistics.median(times)


def _once(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def paired(fn: Callable[[], object], ref: Callable[[], object], reps: int) -> tuple[float, float]:
    """(median seconds of fn(), median of ref_seconds / fn_seconds) over `reps` pairs, the two
    run back to back in alternating order (after one warm-up of each)."""
    fn()
    ref()
    torch.cuda.synchronize()
    times, ratios = [], []
    for i in range(reps):
        if i % 2:
            t, r = _once(fn), _once(ref)
        else:
            r, t = _once(ref), _once(fn)
        times.append(t)
        ratios.append(r / t)
    return statistics.median(times), statistics.median(ratios)


class Ceilings:
    """Pinned contiguous memcpy of `nbytes` (d2h, h2d, both at once on two streams) and a device
    copy of the same bytes, kept allocated so that every measurement can pair with them."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        dev_a = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 256)
        dev_b = torch.empty_like(dev_a)
        dev_c = torch.empty_like(dev_a)
        host_a = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        host_b = torch.empty(nbytes, dtype=torch.uint8).pin_memory().fill_(7)
        s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

        def both() -> None:
            with torch.cuda.stream(s1):
                host_a.copy_(dev_a, non_blocking=True)
            with torch.cuda.stream(s2):
                dev_b.copy_(host_b, non_blocking=True)

        # op -> (copy, bytes it moves): "bidir" and "device_copy" move (or touch) 2 x nbytes
        self.fns: dict[str, tuple[Callable[[], object], int]] = {
            "d2h": (lambda: host_a.copy_(dev_a, non_blocking=True), nbytes),
            "h2d": (lambda: dev_b.copy_(host_b, non_blocking=True), nbytes),
            "bidir": (both, 2 * nbytes),
            "device_copy": (lambda: dev_c.copy_(dev_a), 2 * nbytes),
        }

    def rates(self, reps: int) -> dict[str, float]:
        """GB/s of each ceiling copy (median of `reps`)."""
        return {k: n / timed(fn, reps) / 1e9 for k, (fn, n) in self.fns.items()}


# which ceiling an operation is paired with
CEILING_OF = {"store": "d2h", "load": "h2d", "load_layerwise": "h2d", "both": "bidir"}


class Rates:
    """GB/s and paired ratios of one measured thing, per operation."""

    def __init__(self, ceil: Ceilings, reps: int) -> None:
        self.ceil, self.reps = ceil, reps
        self.gbps: dict[str, float] = {}
        self.ratios: dict[str, float] = {}
        self.notes: dict[str, float] = {}  # diagnostics (milliseconds), not ratios

    def measure(self, op: str, fn: Callable[[], object], nbytes: int) -> None:
        ref, ref_bytes = self.ceil.fns[CEILING_OF[op]]
        if ref_bytes != nbytes:
            raise ValueError(f"{op}: {nbytes} bytes paired with a {ref_bytes}-byte ceiling")
        t, ratio = paired(fn, ref, self.reps)
        self.gbps[op], self.ratios[op] = nbytes / t / 1e9, ratio


def reference_blobs(st: Setup, blocks: torch.Tensor) -> torch.Tensor:
    """Expected page blobs [N, page_bytes] (uint8, CPU) of the pages made of `blocks`."""
    idx = blocks.reshape(-1).to("cuda")
    parts = [p.index_select(0, idx) for p in st.dkv.planes]
    return torch.stack(parts, dim=1).reshape(len(idx), -1).view(torch.uint8).cpu()


def check_store(st: Setup, path: str) -> None:
    exp = reference_blobs(st, st.blocks_a)
    got = st.pool.payloads()[st.slots_a]
    if not torch.equal(exp, got):
        bad = int((exp != got).any(dim=1).sum())
        raise AssertionError(f"store via {path}: {bad} of {st.pages} pages differ")


def check_load(st: Setup, path: str) -> None:
    exp = st.pool.payloads()[st.slots_b]
    got = reference_blobs(st, st.blocks_b)
    if not torch.equal(exp, got):
        bad = int((exp != got).any(dim=1).sum())
        raise AssertionError(f"load via {path}: {bad} of {st.pages} pages differ")


def baselines(st: Setup, ceil: Ceilings, reps: int) -> dict[str, Rates]:
    """GB/s and paired ratios of the usual ways to do the same store and load."""
    host = host_planes(st.pool, st.dkv)
    blocks = st.blocks_a.reshape(-1).tolist()
    slots = st.slots_a.tolist()
    lslots, lblocks = st.slots_b.tolist(), st.blocks_b.reshape(-1).tolist()
    out: dict[str, Rates] = {}

    def naive_store() -> None:
        for b, s in zip(blocks, slots):
            for p, plane in enumerate(st.dkv.planes):
                host[s, p].copy_(plane[b].view(host.dtype), non_blocking=True)

    def naive_load() -> None:
        for b, s in zip(lblocks, lslots):
            for p, plane in enumerate(st.dkv.planes):
                plane[b].view(host.dtype).copy_(host[s, p], non_blocking=True)

    n = st.nbytes
    naive = out["naive per-page per-layer copy_"] = Rates(ceil, 1)
    naive.measure("store", naive_store, n)
    naive.measure("load", naive_load, n)
    stage_h = torch.empty(n, dtype=torch.uint8).pin_memory()
    idx = st.blocks_a.reshape(-1).to("cuda")
    lidx = st.blocks_b.reshape(-1).to("cuda")

    def gather_dma() -> None:
        staged = torch.stack([p.index_select(0, idx) for p in st.dkv.planes], dim=1)
        stage_h.copy_(staged.view(-1).view(torch.uint8), non_blocking=True)

    def dma_scatter() -> None:
        staged = stage_h.to("cuda", non_blocking=True).view(st.pages, st.dkv.num_planes, -1)
        for p, plane in enumerate(st.dkv.planes):
            plane.index_copy_(0, lidx, staged[:, p].view(plane.dtype).reshape(st.pages, -1))

    staged = out["index_select + staging + DMA"] = Rates(ceil, reps)
    staged.measure("store", gather_dma, n)
    staged.measure("load", dma_scatter, n)
    dma = BatchDMA.get()
    if dma.available and dma.batched:
        eng = CopyEngine(st.dkv, st.pool, path="dma")
        gp = eng._gpu
        assert gp is not None
        dev, hst = gp.item_addresses(st.blocks_a, st.slots_a, list(range(st.dkv.num_planes)))
        sizes = torch.full((dev.size,), st.dkv.block_bytes, dtype=torch.int64).numpy()
        stream = torch.cuda.Stream()

        def one_batch() -> None:
            dma.copy(hst, dev, sizes, stream.cuda_stream)
            stream.synchronize()

        batch = out["one cudaMemcpyBatchAsync call"] = Rates(ceil, reps)
        batch.measure("store", one_batch, n)
    return out


# Engine variants: name -> (store path, load path, Triton programs per SM or None for the
# committed thresholds, staged-path settings or None for the committed ones). The grid and mixed
# variants exist to pick the best way to run a store and a load at once; `full` is one program
# per tile (the first GPU run's kernel grid). The staged variants try its chunk size, buffer
# count and batched driver copies.
VARIANTS: dict[str, tuple[str, str, int | None, Staged | None]] = {
    "auto": ("auto", "auto", None, None),
    "staged": ("staged", "staged", None, None),
    "staged-batch": ("staged", "staged", None, Staged(batch=True)),
    "staged-batch-b3": ("staged", "staged", None, Staged(batch=True, buffers=3)),
    "staged-c64m": ("staged", "staged", None, Staged(chunk_bytes=64 << 20, buffers=2)),
    "staged-c8m": ("staged", "staged", None, Staged(chunk_bytes=8 << 20, buffers=3)),
    "store-staged+load-triton": ("staged", "triton", None, None),
    "triton": ("triton", "triton", None, None),
    "dma": ("dma", "dma", None, None),
    "torch": ("torch", "torch", None, None),
    "triton-grid-full": ("triton", "triton", 0, None),
    "triton-cta2": ("triton", "triton", 2, None),
    "triton-cta8": ("triton", "triton", 8, None),
    "store-triton+load-torch": ("triton", "torch", None, None),
    "store-torch+load-triton": ("torch", "triton", None, None),
}
MAIN_VARIANTS = ("auto", "staged", "triton", "dma", "torch", "auto+threads")


def known_variant(path: str) -> bool:
    return path.partition("+threads")[0] in VARIANTS


def engine_rates(st: Setup, ceil: Ceilings, path: str, reps: int) -> Rates:
    """GB/s and paired ratios of the engine variant `path` (a VARIANTS key): store, load,
    layer-wise load (main variants only) and both at once, correctness-checked."""
    base, plus, _ = path.partition("+threads")  # "<variant>+threads": with submit threads
    store_path, load_path, ctas, staged = VARIANTS[base]
    th = Thresholds.read()
    if ctas is not None:
        th = dataclasses.replace(th, triton_ctas_per_sm=ctas)
    if staged is not None:
        th = dataclasses.replace(th, staged=staged)
    eng = CopyEngine(
        st.dkv, st.pool, path=store_path, load_path=load_path, thresholds=th,
        submit_threads=bool(plus),
    )
    n = st.nbytes

    def ok(job: int) -> None:
        # a failed job is a path that does not run here (reported), not wrong data
        if not eng.wait(job).success:
            raise RuntimeError(f"{path} job failed (see the kvtier.transfer.engine warning)")

    def store() -> None:
        ok(eng.submit_store(st.blocks_a, st.slots_a.tolist()))

    def load() -> None:
        ok(eng.submit_load(st.slots_b.tolist(), st.blocks_b))

    def load_layers() -> None:
        job = eng.submit_load(st.slots_b.tolist(), st.blocks_b, layerwise=True)
        for layer in range(st.g.num_layers):
            eng.wait_layer(job, layer)
        ok(job)

    def both() -> None:
        a = eng.submit_store(st.blocks_a, st.slots_a.tolist())
        b = eng.submit_load(st.slots_b.tolist(), st.blocks_b)
        ok(a)
        ok(b)

    st.pool.payloads()[st.slots_a] = 0xA5  # poison what the store must overwrite
    out = Rates(ceil, reps)
    out.measure("store", store, n)
    main = path in MAIN_VARIANTS  # the other variants are checked once, after both at once
    if main:
        check_store(st, path)
    noise = torch.empty((st.pages, st.g.page_bytes), dtype=torch.uint8, device="cuda")
    st.pool.payloads()[st.slots_b] = noise.random_(0, 256).cpu()
    del noise
    for plane in st.dkv.planes:
        plane[st.blocks_b.reshape(-1).to("cuda")] = 0  # poison what the load must overwrite
    out.measure("load", load, n)
    if main:
        check_load(st, path)
        out.measure("load_layerwise", load_layers, n)
    out.measure("both", both, 2 * n)
    out.notes = both_timeline(eng, st, reps)
    check_store(st, path)
    check_load(st, path)
    eng.close()
    return out


def both_timeline(eng: CopyEngine, st: Setup, reps: int) -> dict[str, float]:
    """Medians, in ms, of a store and a load submitted back to back: the CPU time each submit
    took (the load's copies cannot start before the store's submit returns) and each job's GPU
    time (start to done events)."""
    rows = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a = eng.submit_store(st.blocks_a, st.slots_a.tolist())
        t1 = time.perf_counter()
        b = eng.submit_load(st.slots_b.tolist(), st.blocks_b)
        t2 = time.perf_counter()
        ra, rb = eng.wait(a), eng.wait(b)
        rows.append((t1 - t0, t2 - t1, ra.seconds, rb.seconds, time.perf_counter() - t0))
    keys = ("submit_store_ms", "submit_load_ms", "store_gpu_ms", "load_gpu_ms", "both_wall_ms")
    return {k: 1e3 * statistics.median(r[i] for r in rows) for i, k in enumerate(keys)}
