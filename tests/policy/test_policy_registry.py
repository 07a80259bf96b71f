"""The policy registry and replay helper."""

from __future__ import annotations

import pytest

from kvtier.errors import ConfigError
from kvtier.policy import POLICIES, ARCPolicy, LRUPolicy, S3FIFOPolicy, make_policy, replay


def test_names_map_to_classes() -> None:
    assert {"lru": LRUPolicy, "arc": ARCPolicy, "s3fifo": S3FIFOPolicy} == POLICIES
    for name, cls in POLICIES.items():
        p = make_policy(name, 8)
        assert type(p) is cls and p.name == name and p.capacity == 8


def test_unknown_name_lists_the_allowed_ones() -> None:
    with pytest.raises(ConfigError) as info:
        make_policy("lfu", 8)
    assert info.value.field == "policy"
    assert all(n in str(info.value) for n in ("lru", "arc", "s3fifo"))


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_replay_never_exceeds_capacity_and_counts_every_access(name: str) -> None:
    trace = [i % 7 for i in range(50)] + list(range(100, 130))
    p = make_policy(name, 4)
    res = replay(p, trace)
    assert res.accesses == 80 and res.hits + res.misses == 80
    assert len(p) == 4
    p.check_integrity()
    assert replay(make_policy(name, 4), []).hit_ratio == 0.0
