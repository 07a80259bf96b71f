"""Cost-aware loading: load a cached prefix only where that beats recomputing it.

Prefill time grows at least linearly in the tokens computed, while loading costs bytes over the
slowest link on the way (the tier holding the pages, then host-to-device). Pages already in host
memory cost only the host-to-device copy; pages still in a lower tier also cost the tier read.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CostModel:
    """Measured rates (bytes/s, tokens/s); `margin` > 1 demands that a load win clearly."""

    prefill_tokens_per_s: float
    h2d_bytes_per_s: float
    tier_bytes_per_s: float
    margin: float = 1.0

    def load_seconds(self, pages: int, page_bytes: int, *, in_host: bool) -> float:
        nbytes = pages * page_bytes
        t = nbytes / self.h2d_bytes_per_s
        if not in_host:
            t += nbytes / self.tier_bytes_per_s
        return t

    def recompute_seconds(self, tokens: int) -> float:
        return tokens / self.prefill_tokens_per_s

    def worth_loading(self, pages: int, page_bytes: int, page_size: int, *, in_host: bool) -> bool:
        load = self.load_seconds(pages, page_bytes, in_host=in_host)
        return load * self.margin < self.recompute_seconds(pages * page_size)
