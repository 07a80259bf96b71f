"""KVTierCache on tiny random models: a kvtier hit gives the logits of a full recompute while
the model computes only the uncached suffix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kvtier.cache import TieredCache  # noqa: E402
from kvtier.integrations.transformers import KVTierCache, namespace_for  # noqa: E402
from kvtier.integrations.transformers.cost import CostModel  # noqa: E402

PAGE = 16


def _llama() -> Any:
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _mistral_sliding() -> Any:
    cfg = transformers.MistralConfig(
        vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        sliding_window=24,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.MistralForCausalLM(cfg).eval()


class TokenCounter:
    """Counts tokens entering the model through its embedding (the tokens it computes)."""

    def __init__(self, model: Any) -> None:
        self.tokens = 0
        model.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, _m: Any, args: Any, _out: Any) -> None:
        self.tokens += int(args[0].numel())


def _tiered(model: Any, tmp_path: Path) -> TieredCache:
    ns = namespace_for(model.config, PAGE, torch.float32, model_id="tiny-test")
    cfg = {
        "host": {"budget": "8MiB"},
        "tiers": [{"kind": "disk", "path": str(tmp_path), "budget": "64MiB"}],
    }
    return TieredCache(cfg, ns)


def _prefill(
    model: Any, cache: KVTierCache, ids: torch.Tensor, counter: TokenCounter
) -> tuple[torch.Tensor, int]:
    hit = cache.attach(ids)
    before = counter.tokens
    pos = torch.arange(hit, ids.shape[1])
    with torch.no_grad():
        out = model(
            input_ids=ids[:, hit:], past_key_values=cache, cache_position=pos, use_cache=True
        )
    cache.flush()  # store the prompt's new pages (generate does this on its first decode step)
    return out.logits[:, -1], counter.tokens - before


@pytest.mark.parametrize("make", [_llama, _mistral_sliding], ids=["llama", "mistral-sliding"])
def test_hit_matches_recompute_and_skips_prefix(make: Any, tmp_path: Path) -> None:
    model = make()
    counter = TokenCounter(model)
    tiered = _tiered(model, tmp_path)
    try:
        torch.manual_seed(1)
        ids = torch.randint(0, 128, (1, 100))
        # first request: nothing cached, computes everything and stores 6 full pages
        c1 = KVTierCache(model.config, tiered)
        ref, computed = _prefill(model, c1, ids, counter)
        assert c1.hit_tokens == 0 and computed == 100
        assert c1.stored_pages == 100 // PAGE
        # same prompt again: 6 pages (96 tokens) from kvtier, 4 tokens computed
        c2 = KVTierCache(model.config, tiered)
        got, computed = _prefill(model, c2, ids, counter)
        assert c2.hit_tokens == 96
        assert computed == 100 - 96
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        # a prompt sharing 3 pages: 48 tokens hit, the rest computed, logits as a recompute
        ids2 = torch.cat([ids[:, :50], torch.randint(0, 128, (1, 30))], dim=1)
        c3 = KVTierCache(model.config, tiered)
        got2, computed2 = _prefill(model, c3, ids2, counter)
        assert c3.hit_tokens == 48 and computed2 == 80 - 48
        plain = transformers.DynamicCache(config=model.config)
        with torch.no_grad():
            ref2 = model(input_ids=ids2, past_key_values=plain).logits[:, -1]
        torch.testing.assert_close(got2, ref2, rtol=1e-4, atol=1e-4)
        tiered.drain()
        assert tiered.pins() == 0
        tiered.check_integrity()
    finally:
        tiered.close()


@pytest.mark.parametrize("make", [_llama, _mistral_sliding], ids=["llama", "mistral-sliding"])
def test_generate_with_hit_equals_generate_without(make: Any, tmp_path: Path) -> None:
    model = make()
    tiered = _tiered(model, tmp_path)
    try:
        torch.manual_seed(2)
        ids = torch.randint(0, 128, (1, 70))
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=8, do_sample=False)
            warm = KVTierCache(model.config, tiered)
            warm.attach(ids)
            model.generate(ids, past_key_values=warm, max_new_tokens=1, do_sample=False)
            warm.flush()
            cache = KVTierCache(model.config, tiered)
            assert cache.attach(ids) == 64
            out = model.generate(ids, past_key_values=cache, max_new_tokens=8, do_sample=False)
        assert torch.equal(out, ref)
        tiered.drain()
        assert tiered.pins() == 0
    finally:
        tiered.close()


def test_cost_aware_recomputes_when_the_tier_is_slower(tmp_path: Path) -> None:
    """Pages only on disk: a cost model with a slow tier recomputes, a fast one loads them."""
    model = _llama()
    counter = TokenCounter(model)
    ids = torch.randint(0, 128, (1, 70))
    first = _tiered(model, tmp_path)
    try:
        _prefill(model, KVTierCache(model.config, first), ids, counter)
        first.drain()
    finally:
        first.close()
    slow = CostModel(prefill_tokens_per_s=1e6, h2d_bytes_per_s=1e12, tier_bytes_per_s=1e3)
    fast = CostModel(prefill_tokens_per_s=1e3, h2d_bytes_per_s=1e12, tier_bytes_per_s=1e12)
    second = _tiered(model, tmp_path)  # empty host tier; the pages are on disk
    try:
        c = KVTierCache(model.config, second)
        assert c.attach(ids, cost=slow) == 0 and c.skipped_tokens == 64
        c.close()
        c2 = KVTierCache(model.config, second)
        assert c2.attach(ids, cost=fast) == 64 and c2.skipped_tokens == 0
        c2.close()
        second.drain()
        assert second.pins() == 0
    finally:
        second.close()


@pytest.mark.parametrize("make", [_llama, _mistral_sliding], ids=["llama", "mistral-sliding"])
def test_reported_sizes_match_a_cache_that_computed_the_prefix(make: Any, tmp_path: Path) -> None:
    """What the mask and positions are built from (get_seq_length, get_mask_sizes) agrees, layer
    by layer, with a DynamicCache that computed the prefix itself: before the loaded layers
    arrive, and after the suffix's forward."""
    model = make()
    tiered = _tiered(model, tmp_path)
    try:
        ids = torch.randint(0, 128, (1, 90))
        warm = KVTierCache(model.config, tiered)
        _prefill(model, warm, ids, TokenCounter(model))
        c = KVTierCache(model.config, tiered, store=False)
        hit = c.attach(ids)
        assert hit == 80
        plain = transformers.DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids[:, :hit], past_key_values=plain, use_cache=True)
        q = ids.shape[1] - hit
        for layer in range(len(plain.layers)):
            assert c.get_seq_length(layer) == plain.get_seq_length(layer) == hit
            assert c.get_mask_sizes(q, layer) == plain.get_mask_sizes(q, layer)
        with torch.no_grad():
            got = model(input_ids=ids[:, hit:], past_key_values=c, logits_to_keep=1,
                        cache_position=torch.arange(hit, ids.shape[1]), use_cache=True)  # fmt: skip
            ref = model(input_ids=ids[:, hit:], past_key_values=plain, logits_to_keep=1,
                        cache_position=torch.arange(hit, ids.shape[1]), use_cache=True)  # fmt: skip
        torch.testing.assert_close(got.logits, ref.logits, rtol=1e-4, atol=1e-4)
        for layer in range(len(plain.layers)):
            assert c.get_seq_length(layer) == plain.get_seq_length(layer) == ids.shape[1]
            assert c.get_mask_sizes(1, layer) == plain.get_mask_sizes(1, layer)
            assert c.layers[layer].keys.shape == plain.layers[layer].keys.shape
        c.close()
        tiered.drain()
        assert tiered.pins() == 0
    finally:
        tiered.close()
