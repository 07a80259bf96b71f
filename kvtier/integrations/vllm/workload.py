"""Drive one vLLM engine over token prompts, one request at a time, and report what happened.

Run as `python -m kvtier.integrations.vllm.workload < spec.json`: vLLM wants its own process
(it starts worker processes and needs a `__main__` guard), so `kvtier demo` and the end-to-end
tests start this module and read JSON lines from its stdout:

    {"event": "started", "startup_s": ...}
    {"event": "request", "index": i, "cached": n, "ttft_s": t}      # one per request
    {"event": "done", "result": {...}}

Spec (JSON object): `model` (path), `workload` (`{"prompts": [[ids...], ...]}` or
`{"chat": {"sessions", "turns", "system_tokens", "user_tokens", "seed"}}`), `max_tokens`,
`engine` (`num_gpu_blocks`, `block_size`, `max_model_len`), `warmup` (one unmeasured request
first), `kvtier` (None: vLLM alone; else the kv_transfer_config arguments: `config`,
`block_size`, `stats_path`).
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Iterator
from typing import Any


def chat_prompts(
    sessions: int, turns: int, system_tokens: int, user_tokens: int, seed: int, vocab: int = 1000
) -> Iterator[tuple[int, int, list[int]]]:
    """(session, turn, new user tokens) in serving order: every session's turn t, then t+1.
    Every session shares one system prompt (yielded as part of turn 0 by `run`)."""
    rng = random.Random(seed)
    for turn in range(turns):
        for s in range(sessions):
            yield s, turn, [rng.randrange(1, vocab) for _ in range(user_tokens)]


def _emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def _generate(
    engine: Any, rid: str, prompt: list[int], params: Any
) -> tuple[list[int], int, float]:
    """One request, alone: (generated tokens, prompt tokens served from cache, TTFT seconds)."""
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    engine.add_request(rid, TokensPrompt(prompt_token_ids=prompt), params)
    ttft = None
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id != rid:
                continue
            if ttft is None and out.outputs and out.outputs[0].token_ids:
                ttft = time.perf_counter() - t0
            if out.finished:
                final = out
    assert final is not None, f"request {rid} did not finish"
    return list(final.outputs[0].token_ids), int(final.num_cached_tokens or 0), ttft or 0.0


def run(spec: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    from kvtier.integrations.vllm import kv_transfer_config

    eng = spec.get("engine", {})
    kvt = spec.get("kvtier")
    ktc = None
    if kvt is not None:
        ktc = kv_transfer_config(
            kvt.get("config"), block_size=kvt.get("block_size"), stats_path=kvt.get("stats_path")
        )
    t0 = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        skip_tokenizer_init=True,
        dtype="float32",
        max_model_len=int(eng.get("max_model_len", 1024)),
        block_size=int(eng.get("block_size", 32)),
        num_gpu_blocks_override=int(eng.get("num_gpu_blocks", 48)),
        enforce_eager=True,
        enable_prefix_caching=True,
        gpu_memory_utilization=float(eng.get("memory_utilization", 0.05)),
        max_num_seqs=2,
        seed=0,
        kv_transfer_config=ktc,
    )
    _emit({"event": "started", "startup_s": time.perf_counter() - t0})
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=int(spec.get("max_tokens", 8)), temperature=0.0,
                            detokenize=False)
    outputs: list[list[int]] = []
    cached: list[int] = []
    ttft: list[float] = []
    prompt_lens: list[int] = []

    if spec.get("warmup"):  # one throw-away request so the first measured one pays no warm-up
        _generate(engine, "warmup", [1000 + i % 20 for i in range(48)], params)

    def one(prompt: list[int]) -> list[int]:
        i = len(outputs)
        toks, n_cached, t = _generate(engine, f"r{i}", prompt, params)
        outputs.append(toks)
        cached.append(n_cached)
        ttft.append(t)
        prompt_lens.append(len(prompt))
        _emit({"event": "request", "index": i, "cached": n_cached, "ttft_s": t})
        return toks

    work = spec["workload"]
    if "prompts" in work:
        for prompt in work["prompts"]:
            one([int(x) for x in prompt])
    else:
        c = work["chat"]
        rng = random.Random(int(c.get("seed", 0)) + 1)
        system = [rng.randrange(1, 1000) for _ in range(int(c["system_tokens"]))]
        history = {s: list(system) for s in range(int(c["sessions"]))}
        for s, _turn, user in chat_prompts(
            int(c["sessions"]), int(c["turns"]), int(c["system_tokens"]),
            int(c["user_tokens"]), int(c.get("seed", 0)),
        ):
            prompt = history[s] + user
            history[s] = prompt + one(prompt)
    stats = None
    if kvt is not None and kvt.get("stats_path"):
        stats = _read_stats(kvt["stats_path"])
    llm.llm_engine.engine_core.shutdown()  # closes kvtier's cache and its shared pool file
    return {
        "outputs": outputs,
        "cached": cached,
        "ttft_s": ttft,
        "prompt_tokens": prompt_lens,
        "startup_s": time.perf_counter() - t0,
        "kvtier": stats,
    }


def _read_stats(path: str) -> dict[str, Any] | None:
    # The engine writes its counters at the end of each scheduler step; the last step of the
    # last request has run once generate returned, so one read is enough (retry a torn read).
    for _ in range(50):
        try:
            with open(path) as f:
                return dict(json.load(f))
        except (OSError, ValueError):
            time.sleep(0.1)
    return None


def main() -> int:
    spec = json.load(sys.stdin)
    result = run(spec)
    _emit({"event": "done", "result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
