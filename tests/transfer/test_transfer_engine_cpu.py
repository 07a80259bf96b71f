"""The copy engine on the CPU path: every adapter, MLA, shared tensors, block_size < page_size,
random blocks and slots, poisoned destinations; and the job API."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transfer_kv_fixtures import ADAPTERS, MLA_ADAPTERS, build, expected_blob

from kvtier.errors import ConfigError
from kvtier.geometry.spec import KVGeometry
from kvtier.memory.host_pool import HostPool
from kvtier.transfer.engine import CopyEngine

POISON = 0xA5
MHA = KVGeometry(3, 2, 16, 8, "bfloat16")
MLA = KVGeometry(3, 1, 40, 8, "bfloat16", mla=True)


def _roundtrip(
    kind: str,
    g: KVGeometry,
    bs: int,
    seed: int,
    layerwise: bool = False,
    threads: bool = False,
    path: str = "auto",
) -> None:
    rng = random.Random(seed)
    n = g.page_size // bs
    nb, pages, num_slots = 12 * n, 7, 16
    dkv, read, tensors = build(kind, g, bs, nb, seed)
    pool = HostPool(num_slots, g.page_bytes, pin=False)
    pool.payloads().fill_(POISON)
    eng = CopyEngine(dkv, pool, submit_threads=threads, path=path)
    blocks = [rng.sample(range(nb), n) for _ in range(pages)]
    flat = [b for page in blocks for b in page]
    if len(set(flat)) != len(flat):  # a store may read a block twice; keep loads unique below
        blocks = [flat[i * n : (i + 1) * n] for i in range(pages)]
    slots = rng.sample(range(num_slots), pages)
    job = eng.submit_store(blocks, slots)
    res = eng.wait(job)
    assert res.success and res.op == "store" and res.nbytes == pages * g.page_bytes
    untouched = sorted(set(range(num_slots)) - set(slots))
    assert bool((pool.payloads()[untouched] == POISON).all()), "store wrote a foreign slot"
    for page, slot in zip(blocks, slots):
        assert torch.equal(pool.payload(slot), expected_blob(g, read, page)), (kind, slot)
    # load the stored pages back into other (random, distinct) blocks, poisoned first
    want = {s: pool.payload(s).clone() for s in slots}
    targets = rng.sample(range(nb), pages * n)
    lblocks = [targets[i * n : (i + 1) * n] for i in range(pages)]
    for t in tensors:
        t.view(torch.uint8).fill_(POISON)
    job = eng.submit_load(slots, torch.tensor(lblocks), layerwise=layerwise)
    for layer in range(g.num_layers):
        eng.wait_layer(job, layer)
    assert eng.wait(job).success
    for page, slot in zip(lblocks, slots):
        got = expected_blob(g, read, page)
        if kind == "vllm_shared":  # layer pairs share memory: both read the first's data
            blob = want[slot].view(g.num_layers, -1)
            blob = blob[[2 * (la // 2) for la in range(g.num_layers)]].reshape(-1)
            assert torch.equal(got, blob)
        else:
            assert torch.equal(got, want[slot]), (kind, slot)
    eng.close()


@pytest.mark.parametrize("kind", ADAPTERS)
@pytest.mark.parametrize("bs", [8, 4, 1])
def test_adapters_roundtrip(kind: str, bs: int) -> None:
    if kind == "sglang" and bs != MHA.page_size:
        pytest.skip("SGLang blocks are whole pages")
    _roundtrip(kind, MHA, bs, seed=bs)


@pytest.mark.parametrize("kind", MLA_ADAPTERS)
def test_mla_roundtrip(kind: str) -> None:
    _roundtrip(kind, MLA, MLA.page_size, seed=3, layerwise=True)


@pytest.mark.parametrize("dtype", ["float32", "fp8", "float16"])
def test_dtypes_bit_exact(dtype: str) -> None:
    _roundtrip("vllm", KVGeometry(2, 1, 24, 4, dtype), 2, seed=5)


@settings(max_examples=25, deadline=None)
@given(
    layers=st.integers(1, 4),
    heads=st.integers(1, 3),
    head=st.sampled_from([4, 8, 12]),
    n=st.sampled_from([1, 2, 4]),
    bs=st.sampled_from([1, 2, 4]),
    kind=st.sampled_from(["vllm", "vllm_blocks_first", "cross_layer", "vllm_shared"]),
    seed=st.integers(0, 2**16),
)
def test_property_roundtrip(
    layers: int, heads: int, head: int, n: int, bs: int, kind: str, seed: int
) -> None:
    g = KVGeometry(layers, heads, head, n * bs, "float16")
    _roundtrip(kind, g, bs, seed)


@pytest.mark.parametrize("path", ["auto", "staged"])
@pytest.mark.parametrize("kind", ["vllm", "cross_layer", "sglang_mla"])
def test_submit_threads_roundtrip(kind: str, path: str) -> None:
    g = MLA if kind.endswith("mla") else MHA
    _roundtrip(kind, g, g.page_size, seed=9, layerwise=True, threads=True, path=path)


def _engine(threads: bool = False) -> tuple[CopyEngine, HostPool]:
    dkv, _, _ = build("vllm", MHA, 4, 20)
    pool = HostPool(8, MHA.page_bytes, pin=False)
    return CopyEngine(dkv, pool, submit_threads=threads), pool


def test_submit_threads_keep_each_direction_in_order() -> None:
    dkv, read, _ = build("vllm", MHA, 4, 20)
    pool = HostPool(8, MHA.page_bytes, pin=False)
    eng = CopyEngine(dkv, pool, submit_threads=True)
    pages = [[2 * i, 2 * i + 1] for i in range(8)]
    # every job writes slot 0 (and a slot of its own): the last submitted must win
    jobs = [eng.submit_store([pages[i], pages[(i + 1) % 8]], [0, 1 + i % 7]) for i in range(8)]
    assert all(eng.wait(j).success for j in reversed(jobs))
    assert torch.equal(pool.payload(0), expected_blob(MHA, read, pages[7]))
    threads = list(eng._workers.values())
    eng.close()
    assert not any(w._thread.is_alive() for w in threads)


@pytest.mark.parametrize("threads", [False, True])
def test_job_api_reports_each_job_once(threads: bool) -> None:
    eng, _ = _engine(threads)
    a = eng.submit_store([[0, 1], [2, 3]], [0, 1])
    b = eng.submit_load([0], [[5, 6]])
    assert a != b
    assert eng.wait(b).job_id == b
    eng.wait_layer(a, 0)  # on the CPU: returns once the job ran
    results = eng.poll()
    assert [r.job_id for r in results] == [a]
    assert eng.poll() == []
    with pytest.raises(KeyError):
        eng.wait(a)


def test_bad_input_is_refused() -> None:
    eng, _ = _engine()
    with pytest.raises(ValueError):
        eng.submit_store([[0, 1]], [0, 1])  # two slots, one page
    with pytest.raises(ValueError):
        eng.submit_store([[0, 99]], [0])  # block out of range
    with pytest.raises(ValueError):
        eng.submit_store([[0, 1], [2, 3]], [4, 4])  # one slot written twice
    with pytest.raises(ValueError):
        eng.submit_load([0, 1], [[2, 3], [3, 4]])  # one block written twice
    with pytest.raises(ValueError):
        eng.submit_load([8], [[0, 1]])  # slot out of range


def test_config_errors() -> None:
    dkv, _, _ = build("vllm", MHA, 4, 20)
    with pytest.raises(ConfigError):
        CopyEngine(dkv, HostPool(4, MHA.page_bytes + 2, pin=False))
    with pytest.raises(ConfigError):
        CopyEngine(dkv, HostPool(4, MHA.page_bytes, pin=False), path="triton")
    with pytest.raises(ConfigError):
        CopyEngine(dkv, HostPool(4, MHA.page_bytes, pin=False), path="warp")
    with pytest.raises(ConfigError):  # a GPU load path for CPU tensors
        CopyEngine(dkv, HostPool(4, MHA.page_bytes, pin=False), load_path="torch")
    with pytest.raises(ConfigError):
        CopyEngine(dkv, HostPool(4, MHA.page_bytes, pin=False), load_path="warp")


@pytest.mark.parametrize("threads", [False, True])
def test_runtime_fault_is_a_failed_job_not_a_crash(threads: bool) -> None:
    eng, _ = _engine(threads)
    assert eng._rows is not None

    def broken(*args: object) -> None:
        raise RuntimeError("injected copy fault")

    eng._rows.store = broken  # type: ignore[method-assign]
    res = eng.wait(eng.submit_store([[0, 1]], [0]))
    assert not res.success


def test_submit_thread_survives_a_fault_outside_the_copy() -> None:
    eng, _ = _engine(threads=True)
    real = eng._run_cpu

    def broken(*args: object) -> None:
        raise RuntimeError("injected enqueue fault")

    eng._run_cpu = broken  # type: ignore[method-assign]
    assert not eng.wait(eng.submit_store([[0, 1]], [0]), timeout=10).success
    eng._run_cpu = real  # type: ignore[method-assign]
    assert eng.wait(eng.submit_store([[2, 3]], [1]), timeout=10).success  # same thread, alive
    eng.close()


@pytest.mark.parametrize("kind", ["vllm", "vllm_shared", "cross_layer"])
def test_large_items_roundtrip(kind: str) -> None:
    # 16 KiB rows: the row view picks its widest element and still lands bit-exact
    g = KVGeometry(2, 2, 128, 32, "float32")
    _roundtrip(kind, g, 16, seed=11, layerwise=True)
