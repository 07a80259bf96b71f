"""KVTierCache's CUDA path: the side-stream loader against the CPU loader bit for bit while the
compute stream allocates and writes (the caching allocator must not hand it the loader's
buffers), and a tiny Llama's logits with a kvtier hit against a full recompute, with the call
sequence `kvtier bench ttft` uses."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kvtier.cache import TieredCache  # noqa: E402
from kvtier.geometry import KVGeometry  # noqa: E402
from kvtier.integrations.transformers import KVTierCache, namespace_for  # noqa: E402
from kvtier.integrations.transformers.kv_io import LayerLoader, host_copy2d  # noqa: E402
from kvtier.memory.host_pool import HostPool  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

G = KVGeometry(8, 8, 128, 16, "bfloat16")  # 512 KiB pages: the DMA takes a few ms


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(torch.int16)


@pytest.mark.parametrize("pattern", ["one-run", "backwards", "shuffled"])
def test_cuda_loader_matches_cpu_loader_under_allocation_pressure(pattern: str) -> None:
    n = 384
    pool = HostPool(n + 8, G.page_bytes, pin=True)
    assert pool.pinned
    pool.payloads().copy_(torch.randint(0, 256, pool.payloads().shape, dtype=torch.uint8))
    slots = {
        "one-run": list(range(4, 4 + n)),
        "backwards": list(range(n + 3, 3, -1)),
        "shuffled": random.Random(3).sample(range(n + 8), n),
    }[pattern]
    dev = torch.device("cuda")
    cpu = LayerLoader(pool, G, slots, torch.device("cpu"), copy2d=host_copy2d)
    cpu.start()
    gpu = LayerLoader(pool, G, slots, dev)
    gpu.start()
    # the compute stream allocates and fills small and large blocks while copies are in flight
    junk = [torch.full(((k % 7 + 1) * 256,), 2**40, dtype=torch.int64, device=dev)
            for k in range(400)]  # fmt: skip
    junk += [torch.full((1 << 20,), -1, dtype=torch.int64, device=dev) for _ in range(8)]
    for layer in range(G.num_layers):
        k, v = gpu.wait(layer)
        rk, rv = cpu.wait(layer)
        assert k.device.type == "cuda"
        assert torch.equal(_bits(k), _bits(rk)) and torch.equal(_bits(v), _bits(rv))
        del k, v
        junk.append(torch.full((4096,), 7, dtype=torch.int64, device=dev))
    gpu.synchronize()
    assert gpu.finished()
    torch.cuda.synchronize()


def _llama() -> Any:
    cfg = transformers.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda"):
        return transformers.LlamaForCausalLM(cfg).eval()


def test_llama_hit_on_cuda_matches_recompute(tmp_path: Path) -> None:
    model = _llama()
    dev = torch.device("cuda")
    n_tok, cached = 2048, 1920
    ns = namespace_for(model.config, 16, torch.float32, model_id="tiny-gpu-test")
    conf = {"host": {"budget": "256MiB"},
            "tiers": [{"kind": "disk", "path": str(tmp_path), "budget": "512MiB"}]}  # fmt: skip
    ids = torch.randint(0, 512, (1, n_tok), device=dev)

    def prefill(cache: Any, start: int) -> torch.Tensor:
        pos = torch.arange(start, n_tok, device=dev)
        with torch.no_grad():
            out = model(input_ids=ids[:, start:], past_key_values=cache, cache_position=pos,
                        use_cache=True, logits_to_keep=1)  # fmt: skip
        return out.logits[0, -1].float()

    ref = prefill(transformers.DynamicCache(config=model.config), 0)
    with TieredCache(conf, ns) as tiered:
        assert tiered.host_pool.pinned
        warm = KVTierCache(model.config, tiered)
        assert warm.attach(ids[:, :cached]) == 0
        prefill(warm, 0)
        warm.close()
        assert warm.stored_pages == cached // 16
        for _ in range(3):
            c = KVTierCache(model.config, tiered, store=False)
            assert c.attach(ids) == cached
            got = prefill(c, c.hit_tokens)
            c.close()
            torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3)
        tiered.drain()
        assert tiered.pins() == 0
    torch.cuda.synchronize()
