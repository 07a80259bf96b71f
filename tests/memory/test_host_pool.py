import pytest
import torch

from kvtier.errors import ConfigError
from kvtier.keys import HEADER_SIZE
from kvtier.memory.host_pool import SLOT_ALIGN, HostPool


def test_alloc_is_all_or_nothing_and_double_free_is_caught() -> None:
    pool = HostPool(4, 1000)
    assert pool.slot_bytes % SLOT_ALIGN == 0 and pool.slot_bytes >= HEADER_SIZE + 1000
    a = pool.alloc(3)
    assert a is not None and len(set(a)) == 3
    assert pool.alloc(2) is None and pool.num_free == 1
    pool.free(a[:1])
    with pytest.raises(ValueError, match="twice"):
        pool.free(a[:1])
    pool.check_integrity()


def test_payload_views_do_not_overlap() -> None:
    pool = HostPool(3, 100)
    for s in range(3):
        pool.payload(s).fill_(s + 1)
    for s in range(3):
        assert torch.all(pool.payloads()[s] == s + 1)
        assert bytes(pool.blob(s)[HEADER_SIZE : HEADER_SIZE + 2]) == bytes([s + 1, s + 1])


def test_shared_memory_pool_is_seen_by_a_second_mapping(tmp_path: object) -> None:
    path = f"/dev/shm/kvtier-test-{id(tmp_path)}"
    try:
        a = HostPool(2, 64, shm_path=path)
        b = HostPool(2, 64, shm_path=path, create=False)
        a.payload(1).fill_(7)
        assert torch.all(b.payload(1) == 7)
        with pytest.raises(ConfigError, match="shm_path"):
            HostPool(4, 64, shm_path=path, create=False)
        a.close()
        b.close()
    finally:
        import os

        os.unlink(path)


def test_budget_too_small_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"host\.budget"):
        HostPool.for_budget(100, 4096)
