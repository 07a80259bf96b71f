"""Many threads hammer one cache (lookups, stores that succeed or fail, loads, evictions,
promotions from disk); at the end every count must balance."""

import random
import threading
from pathlib import Path

import pytest
import torch

from kvtier.cache import LookupStatus, TieredCache

from .helpers import NS, content, keys

SLOT = 20480


@pytest.mark.parametrize("policy", ["lru", "arc", "s3fifo"])
@pytest.mark.parametrize("mode", ["write_through", "demote"])
def test_concurrent_use_keeps_integrity(tmp_path: Path, policy: str, mode: str) -> None:
    cfg = {
        "host": {"budget": 24 * SLOT, "policy": policy},
        "tiers": [{"kind": "disk", "path": str(tmp_path), "budget": "1MiB", "mode": mode}],
    }
    cache = TieredCache(cfg, NS)
    prefixes = [keys(8, start=1000 * i) for i in range(12)]
    errors: list[BaseException] = []
    corrupt: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(150):
                ks = rng.choice(prefixes)[: rng.randint(1, 8)]
                res = cache.lookup(ks)
                if res.hits and rng.random() < 0.7:
                    try:
                        plan = cache.prepare_load(ks[: res.hits])
                    except KeyError:
                        continue  # evicted between lookup and load: a miss, not an error
                    for key, slot in zip(plan.keys, plan.slots):
                        if not torch.equal(cache.host_pool.payload(slot), content(key)):
                            corrupt.append(key.hex())
                    cache.complete_load(plan.keys)
                    cache.touch(plan.keys)
                elif res.status in (LookupStatus.MISS, LookupStatus.HIT):
                    plan = cache.prepare_store(ks)
                    if plan is None:
                        continue
                    for key, slot in zip(plan.keys, plan.slots):
                        cache.host_pool.payload(slot).copy_(content(key))
                    cache.complete_store(plan.keys, success=rng.random() > 0.1)
                if rng.random() < 0.05:
                    cache.take_events()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    assert not errors, errors[0]
    assert not corrupt, f"{len(corrupt)} pages served with wrong bytes"
    cache.drain()
    cache.check_integrity()
    assert cache.pins() == 0
    stats = cache.stats()
    assert stats.stores > 0 and stats.evictions > 0 and stats.store_failures > 0
    cache.close()
