#!/usr/bin/env bash
# Time to first token on one GPU. First the CUDA tests of the Transformers cache (the loader
# against the CPU loader bit for bit, a tiny Llama hit against recompute; ~30 s), then
# `kvtier bench ttft`: a Llama-3-8B-shaped random model (bf16), 32K-token prompt with the first
# 31.5K tokens in kvtier; host / cold disk / throttled disk against recompute and the floor
# measured in the same run. The bench rewrites $OUT/ttft.json after every step (partial results
# survive a fault or the time limit). Writes $OUT/{gpu,gpu_tests,ttft}.txt and $OUT/ttft.json;
# exits non-zero when a test fails or a cached answer differs from the recompute.
# About 2-4 minutes on an H100:  OUT=/dir bash bench/device/ttft.sh
set -uo pipefail
OUT=${OUT:-/tmp/kvtier-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
pip install -e . --no-deps -q >/dev/null 2>&1 || true
DISK=$(mktemp -d "${TMPDIR:-/tmp}/kvtier-ttft-XXXX")
trap 'rm -rf "$DISK"' EXIT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python -c 'import torch, transformers; print("torch", torch.__version__, "transformers",
           transformers.__version__)' | tee -a "$OUT/gpu.txt"

timeout 150 python -m pytest tests/integrations/test_transformers_gpu.py -q -m gpu -p no:cacheprovider \
    2>&1 | tee "$OUT/gpu_tests.txt"
tests_rc=${PIPESTATUS[0]}

python -m kvtier bench ttft --preset llama3-8b --repeats 3 --disk-path "$DISK" \
    --out "$OUT/ttft.json" 2>&1 | tee "$OUT/ttft.txt"
bench_rc=${PIPESTATUS[0]}

echo "=== ttft summary: gpu tests rc=$tests_rc ($(tail -n 1 "$OUT/gpu_tests.txt")), bench rc=$bench_rc"
grep -A8 '^kvtier bench ttft' "$OUT/ttft.txt" | grep -v '^ERROR' || echo "bench printed no table"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
