"""Transfer registration: KV memory regions registered once, block descriptors per group.

From a `KVCacheSpec` and the engine's real tensors (base address, bytes, device) this builds:
- the distinct memory *regions* to register with a transfer library: tensors with the same base
  and extent are one region, overlapping tensors (views of one buffer) are merged into one;
- per-block *descriptors* `(region, offset, nbytes)` for a request's blocks of each attention
  group, with contiguous block runs merged, so a transfer uses one descriptor per tensor and run
  (two for a `kv_split` tensor, whose K and V halves are apart).

Pure logic on integers: no torch, no NIXL. A plan never touches the memory it describes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from kvtier.errors import ConfigError
from kvtier.geometry.groups import KVCacheSpec, KVTensorSpec

HOST = -1  # device index of host (DRAM) memory


@dataclass(frozen=True)
class TensorMemory:
    """Where one engine tensor lives: `device` is a CUDA index, or HOST (-1) for DRAM."""

    base: int
    nbytes: int
    device: int = HOST

    @classmethod
    def of(cls, tensor: Any) -> TensorMemory:
        """From a contiguous torch tensor (or anything with data_ptr/nbytes/device)."""
        if hasattr(tensor, "is_contiguous") and not tensor.is_contiguous():
            raise ConfigError("tensor", tuple(tensor.shape), "a contiguous tensor")
        index = getattr(tensor.device, "index", None)
        device = HOST if tensor.device.type == "cpu" else int(index or 0)
        return cls(int(tensor.data_ptr()), int(tensor.nbytes), device)


@dataclass(frozen=True)
class Region:
    """A contiguous range of memory registered once."""

    base: int
    nbytes: int
    device: int = HOST

    @property
    def end(self) -> int:
        return self.base + self.nbytes

    @property
    def mem_type(self) -> str:
        return "DRAM" if self.device == HOST else "VRAM"

    @property
    def device_id(self) -> int:
        """The device id a transfer library expects (0 for DRAM)."""
        return 0 if self.device == HOST else self.device


class Descriptor(NamedTuple):
    """`nbytes` at `offset` inside region number `region` of a plan."""

    region: int
    offset: int
    nbytes: int


class BlockRun(NamedTuple):
    """`length` consecutive block ids from `start`."""

    start: int
    length: int


def merge_regions(extents: Iterable[tuple[int, int, int]]) -> list[Region]:
    """Distinct regions from (base, nbytes, device) extents: duplicates and overlaps merged.

    Regions that only touch stay apart: each engine tensor is its own allocation, and merging
    neighbours would register memory the engine may free independently.
    """
    merged: list[Region] = []
    for base, nbytes, device in sorted(set(extents), key=lambda e: (e[2], e[0], -e[1])):
        if nbytes <= 0:
            raise ConfigError("tensor.nbytes", nbytes, "a positive size")
        last = merged[-1] if merged else None
        if last is not None and last.device == device and base < last.end:
            merged[-1] = Region(last.base, max(last.end, base + nbytes) - last.base, device)
        else:
            merged.append(Region(base, nbytes, device))
    return merged


def block_runs(block_ids: Sequence[int]) -> list[BlockRun]:
    """Consecutive ids merged into runs, in the order given."""
    runs: list[BlockRun] = []
    for b in block_ids:
        if runs and runs[-1].start + runs[-1].length == b:
            runs[-1] = BlockRun(runs[-1].start, runs[-1].length + 1)
        else:
            runs.append(BlockRun(b, 1))
    return runs


def paired_runs(src: Sequence[int], dst: Sequence[int]) -> list[tuple[BlockRun, BlockRun]]:
    """Split two equally long block lists into runs consecutive on both sides at once."""
    if len(src) != len(dst):
        raise ConfigError("blocks", (len(src), len(dst)), "as many destination as source blocks")
    pairs: list[tuple[BlockRun, BlockRun]] = []
    for s, d in zip(src, dst):
        if pairs:
            ps, pd = pairs[-1]
            if ps.start + ps.length == s and pd.start + pd.length == d:
                pairs[-1] = (BlockRun(ps.start, ps.length + 1), BlockRun(pd.start, pd.length + 1))
                continue
        pairs.append((BlockRun(s, 1), BlockRun(d, 1)))
    return pairs


class RegistrationPlan:
    """Regions and descriptors for one instance's KV cache (immutable after construction).

    Raises ConfigError when a tensor of the spec is missing, smaller than the spec says, or
    when block ids fall outside the cache.
    """

    def __init__(self, spec: KVCacheSpec, tensors: Mapping[str, TensorMemory]) -> None:
        self.spec = spec
        for t in spec.tensors:
            if t.name not in tensors:
                raise ConfigError("tensors", t.name, f"memory for every tensor of the spec: "
                                  f"{[x.name for x in spec.tensors]}")
            if tensors[t.name].nbytes < t.size_bytes:
                raise ConfigError(f"tensors[{t.name}].nbytes", tensors[t.name].nbytes,
                                  f">= the spec's {t.size_bytes}")
        mems = {t.name: tensors[t.name] for t in spec.tensors}
        self.regions: tuple[Region, ...] = tuple(
            merge_regions((m.base, m.nbytes, m.device) for m in mems.values())
        )
        self._place: dict[str, tuple[int, int]] = {}
        for name, m in mems.items():
            for ri, r in enumerate(self.regions):
                if r.device == m.device and r.base <= m.base < r.end:
                    self._place[name] = (ri, m.base - r.base)
                    break
        self._group_tensors = [spec.tensors_of_group(g) for g in range(len(spec.groups))]

    def place(self, tensor: str) -> tuple[int, int]:
        """(region index, offset in it) of a tensor's first byte."""
        return self._place[tensor]

    def _check(self, group: int, runs: Iterable[BlockRun]) -> None:
        if not 0 <= group < len(self.spec.groups):
            raise ConfigError("group", group, f"0..{len(self.spec.groups) - 1}")
        for r in runs:
            if r.start < 0 or r.length <= 0 or r.start + r.length > self.spec.num_blocks:
                raise ConfigError("blocks", r, f"block ids in 0..{self.spec.num_blocks - 1}")

    def check_blocks(self, blocks: Mapping[int, Sequence[int]]) -> None:
        """ConfigError unless every group exists and every block id is in range. O(blocks):
        callers that never build descriptors (packed transfers) check with this."""
        for g, ids in blocks.items():
            if ids:
                self._check(g, [BlockRun(min(ids), 1), BlockRun(max(ids), 1)])
            elif not 0 <= g < len(self.spec.groups):
                raise ConfigError("group", g, f"0..{len(self.spec.groups) - 1}")

    def _tensor_descs(self, tensor: KVTensorSpec, block: int, run: BlockRun) -> list[Descriptor]:
        region, off = self._place[tensor.name]
        if not tensor.kv_split:
            return [Descriptor(region, off + run.start * block, run.length * block)]
        half = block // 2
        v_base = off + self.spec.num_blocks * half
        return [Descriptor(region, off + run.start * half, run.length * half),
                Descriptor(region, v_base + run.start * half, run.length * half)]

    def descriptors(self, group: int, runs: Sequence[BlockRun]) -> list[Descriptor]:
        """Descriptors of `runs` of `group`: per tensor of the group, per run."""
        self._check(group, runs)
        block = self.spec.block_bytes(group)
        return [d for t in self._group_tensors[group] for r in runs
                for d in self._tensor_descs(t, block, r)]

    def request_descriptors(self, blocks: Mapping[int, Sequence[int]]) -> list[Descriptor]:
        """One side's descriptors for a request's blocks, {group: block ids}."""
        return [d for g in sorted(blocks) for d in self.descriptors(g, block_runs(blocks[g]))]

    def transfer_descriptors(
        self,
        src_blocks: Mapping[int, Sequence[int]],
        dst_plan: RegistrationPlan,
        dst_blocks: Mapping[int, Sequence[int]],
    ) -> tuple[list[Descriptor], list[Descriptor]]:
        """Aligned (local, remote) descriptor lists moving src_blocks into dst_blocks.

        Entry i of both lists has the same size; runs are split wherever either side breaks
        and pairs adjacent on both sides are merged (`coalesce`), e.g. across layers that
        share one buffer, so a whole-region run is one descriptor.
        The destination spec must lay blocks out like this one (block count may differ).
        """
        if sorted(src_blocks) != sorted(dst_blocks):
            raise ConfigError("dst_blocks", sorted(dst_blocks), f"groups {sorted(src_blocks)}")
        if not same_layout(self.spec, dst_plan.spec):
            raise ConfigError("dst_plan.spec", "different layout", "the same groups and tensors")
        local: list[Descriptor] = []
        remote: list[Descriptor] = []
        for g in sorted(src_blocks):
            pairs = paired_runs(src_blocks[g], dst_blocks[g])
            local += self.descriptors(g, [p[0] for p in pairs])
            remote += dst_plan.descriptors(g, [p[1] for p in pairs])
        return coalesce(local, remote)

    def addresses(self, descs: Iterable[Descriptor]) -> list[tuple[int, int, int]]:
        """(address, nbytes, device id) triples, as transfer libraries take them."""
        out = []
        for d in descs:
            r = self.regions[d.region]
            out.append((r.base + d.offset, d.nbytes, r.device_id))
        return out


def coalesce(local: Sequence[Descriptor], remote: Sequence[Descriptor]
             ) -> tuple[list[Descriptor], list[Descriptor]]:
    """Merge aligned descriptor pairs that are adjacent on *both* sides into one pair.

    Runs of consecutive layers (tensors that are views of one buffer) or of a kv_split tensor's
    K and V halves become one long copy when source and destination both continue where the
    previous pair ended: fewer, larger copies cost less per byte in every transport. Pairs are
    taken in local address order; the result moves exactly the same bytes to the same places.
    """
    if len(local) != len(remote):
        raise ConfigError("descriptors", (len(local), len(remote)), "aligned lists")
    order = sorted(range(len(local)), key=lambda i: (local[i].region, local[i].offset))
    out_l: list[Descriptor] = []
    out_r: list[Descriptor] = []
    for i in order:
        a, b = local[i], remote[i]
        if out_l:
            pa, pb = out_l[-1], out_r[-1]
            if (pa.region == a.region and pa.offset + pa.nbytes == a.offset
                    and pb.region == b.region and pb.offset + pb.nbytes == b.offset):
                out_l[-1] = Descriptor(pa.region, pa.offset, pa.nbytes + a.nbytes)
                out_r[-1] = Descriptor(pb.region, pb.offset, pb.nbytes + b.nbytes)
                continue
        out_l.append(a)
        out_r.append(b)
    return out_l, out_r


def same_layout(a: KVCacheSpec, b: KVCacheSpec) -> bool:
    """True when blocks of `a` and `b` can be copied descriptor for descriptor."""
    return a.groups == b.groups and [(t.name, t.layers, t.kv_split) for t in a.tensors] == [
        (t.name, t.layers, t.kv_split) for t in b.tensors
    ]
