"""Tensor-parallel mapping sync: two processes, one decides, both map the same slots."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import random
from pathlib import Path

import pytest

from kvtier.errors import CapacityError, TierError
from kvtier.memory.elastic import AllocationError, ElasticPool, MapOp
from kvtier.memory.elastic_layout import ElasticLayout, PoolLimits
from kvtier.memory.vmm_sim import SimBackend
from kvtier.memory.vmm_sync import (
    FileChannel,
    MapChannel,
    TorchDistChannel,
    apply_ops,
    default_channel,
    sync_step,
)

G = 4096
LAYOUT = ElasticLayout(regions=2, chunk_bytes=1024, num_blocks=96, page_bytes=G)
SLOT = LAYOUT.slot_phys_bytes
STEPS = 25


def _rank(rank: int, channel: MapChannel, out: mp.Queue) -> None:  # type: ignore[type-arg]
    # each rank: its own two simulated GPUs; local GPU fits 3 slots, then its peer
    be = SimBackend([G + 3 * SLOT, 100 * SLOT], granularity=G)
    pool = ElasticPool(be, LAYOUT, 0, PoolLimits(None, ((1, 100 * SLOT),)), reserve_slots=1,
                       record_ops=rank == 0)
    rng = random.Random(7)
    held: list[int] = []
    for _ in range(STEPS):
        if rank == 0:
            if rng.random() < 0.6:
                with contextlib.suppress(CapacityError):
                    held += pool.alloc(rng.randint(1, 12))
            elif held:
                n = rng.randint(1, len(held))
                pool.free(held[:n])
                del held[:n]
            pool.maintain()
        sync_step(pool, channel, leader=rank == 0)
    pool.check_integrity()
    placement = [pool._slot_dev[s] for s in range(LAYOUT.num_slots)]
    out.put((rank, placement, be.used(0), be.used(1)))


def _run_two(make_channel: object) -> None:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=make_channel, args=(r, out)) for r in range(2)]  # type: ignore[arg-type]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    (_, lead, l0, l1), (_, follow, f0, f1) = results
    assert lead == follow and (l0, l1) == (f0, f1)
    assert 1 in lead and 0 in lead  # the run did reach the peer tier


class _FileMain:
    def __init__(self, directory: Path) -> None:
        self.directory = str(directory)

    def __call__(self, rank: int, out: mp.Queue) -> None:  # type: ignore[type-arg]
        _rank(rank, FileChannel(self.directory, timeout=60), out)


class _GlooMain:
    def __init__(self, directory: Path) -> None:
        self.init = f"file://{directory}/pg"

    def __call__(self, rank: int, out: mp.Queue) -> None:  # type: ignore[type-arg]
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=self.init, rank=rank, world_size=2)
        try:
            _rank(rank, TorchDistChannel(src=0), out)
        finally:
            dist.destroy_process_group()


def test_file_channel_two_processes(tmp_path: Path) -> None:
    _run_two(_FileMain(tmp_path / "chan"))


@pytest.mark.slow
def test_torch_distributed_channel_two_processes(tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed")
    _run_two(_GlooMain(tmp_path))


def test_default_channel_without_process_group_is_a_file_channel(tmp_path: Path) -> None:
    chan = default_channel(tmp_path / "c")
    assert isinstance(chan, FileChannel)
    ops = [MapOp("map", 0, 0), MapOp("unmap", 4096, -1)]
    assert chan.exchange(ops) == ops
    assert FileChannel(tmp_path / "c").exchange(None) == ops


def test_file_channel_timeout_and_bad_ops(tmp_path: Path) -> None:
    follower = FileChannel(tmp_path, timeout=0.05)
    with pytest.raises(TierError):
        follower.exchange(None)
    be = SimBackend([100 * SLOT], granularity=G)
    pool = ElasticPool(be, LAYOUT, 0)
    with pytest.raises(AllocationError, match="not a free mapped slot"):
        apply_ops(pool, [MapOp("unmap", 0, -1)])
    with pytest.raises(AllocationError, match="tier 5"):
        apply_ops(pool, [MapOp("map", 0, 5)])
    pool.check_integrity()
