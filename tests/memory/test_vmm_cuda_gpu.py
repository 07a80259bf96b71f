"""CudaVmmBackend and ElasticPool on real GPUs (device machine only; skipped elsewhere)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

from kvtier.errors import CapacityError  # noqa: E402
from kvtier.geometry import KVGeometry  # noqa: E402
from kvtier.memory.elastic import ElasticPool  # noqa: E402
from kvtier.memory.elastic_layout import ElasticLayout, PoolLimits  # noqa: E402
from kvtier.memory.elastic_torch import cross_layer_tensor, layer_tensors  # noqa: E402
from kvtier.memory.vmm_backend import DriverError  # noqa: E402

GEO = KVGeometry(4, 8, 128, 16, "bfloat16")  # 32 KiB chunks: 64 blocks per 2 MiB slot


@pytest.fixture(scope="module")
def backend():  # type: ignore[no-untyped-def]
    pytest.importorskip("cuda.bindings", reason="needs cuda-bindings")
    from kvtier.memory.vmm_cuda import CudaVmmBackend

    torch.cuda.init()
    be = CudaVmmBackend()
    yield be
    be.close()


def test_granularity_and_driver_errors_do_not_abort(backend) -> None:  # type: ignore[no-untyped-def]
    assert backend.granularity(0) == 2 << 20
    h = backend.create(0, 2 << 20)
    with pytest.raises(DriverError):
        backend.map(0x1000, 2 << 20, h)  # not a reserved address
    with pytest.raises(DriverError):
        backend.create(backend.device_count(), 2 << 20)
    backend.release(h)
    too_big = (backend.mem_info(0).total // (2 << 20) + 1) * (2 << 20)
    with pytest.raises(CapacityError):
        backend.create(0, too_big)


def test_layer_first_views_zero_fill_alloc_write_free(backend) -> None:  # type: ignore[no-untyped-def]
    lay = ElasticLayout.layer_first(GEO, 512)
    pool = ElasticPool(backend, lay, 0, reserve_slots=1)
    try:
        layers = layer_tensors(pool, GEO)
        assert len(layers) == 4 and layers[0].shape == (2, 512, 16, 8, 128)
        assert layers[0].device == torch.device("cuda:0")
        whole = cross_layer_tensor(pool, GEO)
        assert int(whole.count_nonzero()) == 0  # all unbacked: the zero page
        free0 = backend.mem_info(0).free
        blocks = pool.alloc(100)
        assert backend.mem_info(0).free < free0
        idx = torch.tensor(blocks, device="cuda:0")
        for i, t in enumerate(layers):
            t[:, idx] = float(i + 1)
        torch.cuda.synchronize()
        for i, t in enumerate(layers):
            assert bool((t[:, idx] == float(i + 1)).all())
        unalloc = [b for b in range(512) if b not in set(blocks)]
        assert int(whole[:, :, unalloc[-50:]].count_nonzero()) == 0
        pool.check_integrity()
        pool.free(blocks)
        pool.shrink(0)
        torch.cuda.synchronize()
        assert int(whole.count_nonzero()) == 0  # released pages read as zeros again
        assert pool.mapped_bytes() == 0
        pool.check_integrity()
    finally:
        pool.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_pages_on_peer_gpu_read_by_local_kernels(backend) -> None:  # type: ignore[no-untyped-def]
    if not backend.can_access_peer(0, 1):
        pytest.skip("no peer access between GPU0 and GPU1")
    lay = ElasticLayout.layer_first(GEO, 512)
    slot = lay.slot_phys_bytes
    pool = ElasticPool(backend, lay, 0, PoolLimits(None, ((1, 4 * slot),), local=2 * slot))
    try:
        used1 = backend.mem_info(1).free
        blocks = pool.alloc(4 * 64)
        assert [pool.device_of(b) for b in blocks[::64]] == [0, 0, 1, 1]
        assert backend.mem_info(1).free <= used1 - 2 * slot
        whole = cross_layer_tensor(pool, GEO)
        ref = torch.randn(whole[:, :, blocks].shape, device="cuda:0").to(torch.bfloat16)
        whole[:, :, blocks] = ref
        torch.cuda.synchronize()
        assert torch.equal(whole[:, :, blocks], ref)
        pool.check_integrity()
        pool.free(blocks)
        pool.shrink(0)
        assert pool.usage() == {}
    finally:
        pool.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_view_of_range_starting_on_peer_page_is_not_a_copy(backend) -> None:  # type: ignore[no-untyped-def]
    if not backend.can_access_peer(0, 1):
        pytest.skip("no peer access between GPU0 and GPU1")
    lay = ElasticLayout(regions=1, chunk_bytes=2 << 20, num_blocks=4)
    pool = ElasticPool(backend, lay, 0, PoolLimits(None, ((1, 4 << 20),), local=0),
                       reserve_slots=0)
    try:
        blocks = pool.alloc(2)
        assert [pool.device_of(b) for b in blocks] == [1, 1]
        view = backend.tensor(pool.base, (2 << 20,), torch.float16, 0)
        assert view.data_ptr() == pool.base and view.device == torch.device("cuda:0")
        ref = torch.randn(2 << 20, device="cuda:0", dtype=torch.float16)
        view.copy_(ref)
        again = backend.tensor(pool.base, (2 << 20,), torch.float16, 0)
        assert torch.equal(again, ref)  # the write landed in the pool's (peer) pages
        pool.free(blocks)
    finally:
        pool.close()


def test_bench_attention_rows_small(backend) -> None:  # type: ignore[no-untyped-def]
    from kvtier.cli.bench_vmm_attn import attention_rows

    rows = {r["name"]: r for r in attention_rows(backend, 2, 512)}
    assert rows["KV bytes elastic == static (after copy)"]["ok"] is True
    assert rows["KV bytes elastic == static (after timing)"]["ok"] is True
    assert rows["SDPA default: max |elastic - static|"]["ok"] is True
