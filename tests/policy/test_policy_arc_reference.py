"""ARC against a literal, list-based transcription of Megiddo & Modha's pseudocode.

``exact=True`` follows the paper step by step: adapt p, then REPLACE with the tie rule for keys
found in B2. ``exact=False`` makes the two changes the split evict()/insert() interface forces
(REPLACE first, without the tie rule and falling back to T1 when T2 is empty; then adapt p
from the ghost sizes after that REPLACE); with them the policy must agree with
the transcription on every request, and without them it must stay within a point of hit ratio.
"""

from __future__ import annotations

import random

import hypothesis.strategies as st
from hypothesis import given, settings

from kvtier.cli.tracegen import TRACES
from kvtier.policy import ARCPolicy, replay


class PaperARC:
    def __init__(self, c: int, exact: bool) -> None:
        self.c, self.exact, self.p = c, exact, 0.0
        self.t1: list[str] = []
        self.t2: list[str] = []
        self.b1: list[str] = []
        self.b2: list[str] = []

    def _replace(self, in_b2: bool) -> None:
        tie = self.exact and in_b2 and len(self.t1) == self.p
        # the split interface evicts before p adapts, so T2 can be empty there: take T1
        if self.t1 and (tie or len(self.t1) > self.p or (not self.exact and not self.t2)):
            self.b1.append(self.t1.pop(0))
        else:
            self.b2.append(self.t2.pop(0))

    def request(self, x: str) -> bool:
        c = self.c
        if x in self.t1 or x in self.t2:  # case I
            (self.t1 if x in self.t1 else self.t2).remove(x)
            self.t2.append(x)
            return True
        if x in self.b1 or x in self.b2:  # cases II and III
            in_b1 = x in self.b1
            if not self.exact:
                self._replace(not in_b1)
            if in_b1:
                self.p = min(float(c), self.p + max(1.0, len(self.b2) / len(self.b1)))
            else:
                self.p = max(0.0, self.p - max(1.0, len(self.b1) / len(self.b2)))
            if self.exact:
                self._replace(not in_b1)
            (self.b1 if in_b1 else self.b2).remove(x)
            self.t2.append(x)
            return False
        l1 = len(self.t1) + len(self.b1)  # case IV
        total = l1 + len(self.t2) + len(self.b2)
        if l1 == c:
            if len(self.t1) < c:
                self.b1.pop(0)
                self._replace(False)
            else:
                self.t1.pop(0)
        elif total >= c:
            if total == 2 * c:
                self.b2.pop(0)
            self._replace(False)
        self.t1.append(x)
        return False


def paper_hits(trace: list[str], c: int, exact: bool) -> int:
    ref = PaperARC(c, exact)
    return sum(ref.request(x) for x in trace)


@settings(max_examples=200, deadline=None)
@given(
    c=st.integers(1, 6),
    trace=st.lists(st.integers(0, 12).map(str), max_size=120),
)
def test_agrees_request_by_request_with_the_split_transcription(c: int, trace: list[str]) -> None:
    policy: ARCPolicy[str] = ARCPolicy(c)
    ref = PaperARC(c, exact=False)
    for x in trace:
        hit = x in policy
        if hit:
            policy.access(x)
        else:
            if len(policy) >= c:
                policy.evict(1)
            policy.insert(x)
        assert ref.request(x) == hit
        s = policy.snapshot()
        assert (s["t1"], s["t2"], s["b1"], s["b2"]) == (ref.t1, ref.t2, ref.b1, ref.b2)
        assert s["p"] == ref.p
        policy.check_integrity()


def test_within_a_point_of_the_paper_on_the_benchmark_traces() -> None:
    for spec in TRACES.values():
        trace = spec.generate(20_000, 3)
        c = spec.capacities[0] // 2
        ours = replay(ARCPolicy(c), trace).hits
        paper = paper_hits(trace, c, exact=True)
        assert abs(ours - paper) <= 0.01 * len(trace), (spec.name, ours, paper)


def test_within_a_point_of_the_paper_on_random_small_traces() -> None:
    rng = random.Random(5)
    trace = [str(int(rng.paretovariate(1.2))) for _ in range(20_000)]
    for c in (4, 16, 64):
        ours = replay(ARCPolicy(c), trace).hits
        assert abs(ours - paper_hits(trace, c, exact=True)) <= 0.01 * len(trace)
