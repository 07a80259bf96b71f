"""A Transformers `Cache` that reuses prompt prefixes stored in kvtier.

    cache = KVTierCache(model.config, tiered)      # tiered: kvtier.cache.TieredCache
    hit = cache.attach(input_ids)                  # tokens served from kvtier (page multiple)
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=...)

`attach` looks up the prompt's page keys, leases the leading pages kvtier holds (waiting a bounded
time for pages being promoted from lower tiers) and starts loading them layer by layer. The
cache then reports `hit` tokens as already present, so `generate` (or a plain forward on
`input_ids[:, hit:]` with `cache_position`) computes only the uncached suffix. When the prefill
forward has gone through every layer, the prompt's new full pages are stored in kvtier. Sliding-
window layers are stored in full (kvtier pages hold every token) and keep only their window when
loaded. One sequence per cache (batch size 1).

Cost-aware loading: `attach(..., cost=CostModel(...))` recomputes cached pages whose load (tier
read + host-to-device copy, from measured rates) would take longer than recomputing them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache

from kvtier.cache import LookupStatus, TieredCache
from kvtier.geometry import KVGeometry
from kvtier.geometry.spec import canonical_dtype
from kvtier.integrations.transformers.cost import CostModel
from kvtier.integrations.transformers.kv_io import LayerLoader, pages_from_hf, write_slots
from kvtier.keys import Namespace, PageKey, page_keys

log = logging.getLogger("kvtier.integrations.transformers")


def geometry_for(config: Any, page_size: int = 16, dtype: Any = None) -> KVGeometry:
    """The KV geometry of a decoder config (uniform layers: every layer the same heads/width)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    dt = dtype if dtype is not None else (getattr(text, "dtype", None) or torch.float32)
    return KVGeometry(text.num_hidden_layers, heads, head_dim, page_size, canonical_dtype(dt))


def namespace_for(config: Any, page_size: int = 16, dtype: Any = None, **kw: Any) -> Namespace:
    model_id = kw.pop("model_id", None) or getattr(config, "_name_or_path", "") or "hf-model"
    return Namespace(model_id, geometry_for(config, page_size, dtype), **kw)


class KVTierCache(DynamicCache):
    """DynamicCache whose prompt prefix comes from (and goes back to) a TieredCache.

    Not thread-safe (one generate call at a time). Leases taken by `attach` are released when the
    loads finish (after the prefill forward) or by `release()`; `close()` does both.
    """

    def __init__(
        self,
        config: Any,
        tiered: TieredCache,
        *,
        store: bool = True,
        promote_wait_s: float = 5.0,
    ) -> None:
        super().__init__(config=config)
        self.tiered = tiered
        self.g = tiered.namespace.geometry
        self.store_enabled = store
        self.promote_wait_s = promote_wait_s
        self.hit_tokens = 0
        self.stored_pages = 0
        self.skipped_tokens = 0  # cached tokens recomputed because loading them was slower
        self._store_due = False
        self._loader: LayerLoader | None = None
        self._leased: list[PageKey] = []
        self._keys: list[PageKey] = []
        self._new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._prefill_pending = False

    # -- prefix lookup and load ----------------------------------------------------------------
    def lookup(self, input_ids: torch.Tensor | Sequence[int], cost: CostModel | None = None) -> int:
        """Tokens of the prompt's prefix that kvtier can serve now. Pages being promoted from a
        lower tier are waited for (up to `promote_wait_s`) unless `cost` says recomputing them
        is faster; then only the pages already in host memory count."""
        tokens = self._tokens(input_ids)
        keys = page_keys(self.tiered.namespace, tokens)[: (len(tokens) - 1) // self.g.page_size]
        return self._lookup_keys(keys, cost)

    def _lookup_keys(self, keys: list[PageKey], cost: CostModel | None) -> int:
        deadline = time.monotonic() + self.promote_wait_s
        first = True
        while True:
            res = self.tiered.lookup(keys)
            pending = res.status in (LookupStatus.PENDING, LookupStatus.RETRY)
            if first and pending and cost is not None and res.pending:
                g = self.g
                if not cost.worth_loading(res.pending, g.page_bytes, g.page_size, in_host=False):
                    self.skipped_tokens = res.pending * g.page_size
                    return res.hits * g.page_size
            first = False
            if not pending or time.monotonic() > deadline:
                return res.hits * self.g.page_size
            time.sleep(0.0005)

    def attach(
        self,
        input_ids: torch.Tensor | Sequence[int],
        *,
        device: torch.device | str | None = None,
        load: bool = True,
        cost: CostModel | None = None,
    ) -> int:
        """Prepare this (empty) cache for the prompt; return the prefix tokens loaded.

        At least one prompt token is always left to compute (the model needs its logits). With
        `load=False` nothing is loaded (recompute) but new pages are still stored. With `cost`,
        pages whose load would be slower than recomputing them are recomputed (cost-aware).
        """
        self.flush()
        if self.get_seq_length() or self._loader is not None:
            raise RuntimeError("attach() needs an empty cache")
        tokens = self._tokens(input_ids)
        s = self.g.page_size
        self._keys = page_keys(self.tiered.namespace, tokens)
        self.skipped_tokens = 0
        # at least one token is left to compute: only pages ending before the last token count
        hit = self._lookup_keys(self._keys[: (len(tokens) - 1) // s], cost) if load else 0
        n = hit // s
        if n and cost is not None and not cost.worth_loading(n, self.g.page_bytes, s, in_host=True):
            self.skipped_tokens += n * s
            n = 0
        dev = torch.device(device) if device is not None else self._device(input_ids)
        if n:
            keys = self._keys[:n]
            try:
                plan = self.tiered.prepare_load(keys)
            except KeyError:  # evicted between lookup and lease: recompute
                n = 0
            else:
                self._leased = list(keys)
                self._loader = LayerLoader(self.tiered.host_pool, self.g, plan.slots, dev)
                self._loader.start()
                self._install_prefix(n * s)
        self.hit_tokens = n * s
        self._prefill_pending = True
        self._new = {}
        return self.hit_tokens

    def _install_prefix(self, length: int) -> None:
        """Make every layer report `length` cached tokens before its data has arrived."""
        for layer in self.layers:
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = length
        self._prefix_len = length

    @staticmethod
    def _tokens(input_ids: torch.Tensor | Sequence[int]) -> list[int]:
        if isinstance(input_ids, torch.Tensor):
            if input_ids.dim() == 2:
                if input_ids.shape[0] != 1:
                    raise ValueError("KVTierCache handles one sequence (batch size 1)")
                input_ids = input_ids[0]
            return list(map(int, input_ids.tolist()))  # one device sync, plain ints
        return list(map(int, input_ids))

    @staticmethod
    def _device(input_ids: Any) -> torch.device:
        return input_ids.device if isinstance(input_ids, torch.Tensor) else torch.device("cpu")

    # -- Cache API -----------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self._loader is not None and self._loader.layers[layer_idx] is not None:
            return self._prefix_len
        return super().get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: Any, layer_idx: int = 0) -> tuple[int, int]:
        if self._loader is not None and self._loader.layers[layer_idx] is not None:
            layer = self.layers[layer_idx]
            window = getattr(layer, "sliding_window", None)
            if window is None:
                return self._prefix_len + _qlen(query_length), 0
            # the sliding layer will hold its last window-1 prefix tokens
            offset = max(self._prefix_len - window + 1, 0)
            return min(self._prefix_len, window - 1) + _qlen(query_length), offset
        return super().get_mask_sizes(query_length, layer_idx)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        if self._store_due:
            self.flush()  # first decode step: the first token is out, store the prompt's pages
        if self._loader is not None and self._loader.layers[layer_idx] is not None:
            k, v = self._loader.wait(layer_idx)
            layer: Any = self.layers[layer_idx]
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = 0  # update() below counts the prefix in again
            layer.update(k, v)
        if self._prefill_pending and layer_idx not in self._new:
            self._new[layer_idx] = (key_states, value_states)
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if self._prefill_pending and len(self._new) == len(self.layers):
            self._finish_prefill()
        return out

    # -- after the prefill forward -------------------------------------------------------------
    def _finish_prefill(self) -> None:
        """Every layer has its prompt KV: leases go back now; the store waits for `flush()` (or
        the next forward) so that it never delays the first token."""
        self._prefill_pending = False
        if self._loader is not None:
            self._loader.synchronize()
            self._loader = None
        self.release()
        self._store_due = self.store_enabled

    def flush(self) -> None:
        """Store the prompt's new full pages in kvtier (no-op when nothing is due)."""
        if not self._store_due:
            return
        self._store_due = False
        try:
            self._store_new()
        except Exception as exc:  # storing is best effort: the answer is already computed
            log.warning("kvtier store after prefill failed: %s", exc)
        self._new = {}

    def _store_new(self) -> None:
        s = self.g.page_size
        first = self.hit_tokens // s
        computed = self._new[0][0].shape[-2]
        last = min(len(self._keys), (self.hit_tokens + computed) // s)
        if last <= first:
            return
        keys = self._keys[first:last]
        plan = self.tiered.prepare_store(keys)
        if plan is None or not plan.keys:
            return
        wanted = {k: i for i, k in enumerate(keys)}
        ks = [self._new[i][0] for i in range(len(self.layers))]
        vs = [self._new[i][1] for i in range(len(self.layers))]
        pages = pages_from_hf(ks, vs, self.g, 0, last - first)
        rows = [wanted[k] for k in plan.keys]
        try:
            write_slots(self.tiered.host_pool, plan.slots, pages[rows])
        except BaseException:
            self.tiered.complete_store(plan.keys, success=False)
            raise
        self.tiered.complete_store(plan.keys, success=True)
        self.stored_pages += len(plan.keys)

    def release(self) -> None:
        """Give back the page leases taken by attach (waits for in-flight host reads)."""
        if self._loader is not None:
            self._loader.synchronize()
        if self._leased:
            self.tiered.complete_load(self._leased)
            self._leased = []

    def close(self) -> None:
        self.flush()
        self.release()  # waits for in-flight host reads before the leases go back
        self._loader = None


def _qlen(query_length: Any) -> int:
    return (
        int(query_length.shape[0]) if isinstance(query_length, torch.Tensor) else int(query_length)
    )
