#!/usr/bin/env bash
# Time to first token on one GPU: a Llama-3-8B-shaped random model (bf16), 32K-token prompt with
# the first 31.5K tokens in kvtier; host / cold disk / throttled disk against recompute and the
# floor measured in the same run. Writes $OUT/ttft.json and $OUT/ttft.txt; exits non-zero when
# a cached answer differs from the recompute. About 1-3 minutes on an H100.
set -euo pipefail
OUT=${OUT:-/tmp/kvtier-out}
mkdir -p "$OUT"
pip install -e . --no-deps -q >/dev/null 2>&1 || true
DISK=$(mktemp -d "${TMPDIR:-/tmp}/kvtier-ttft-XXXX")
trap 'rm -rf "$DISK"' EXIT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python -m kvtier bench ttft --preset llama3-8b --repeats 3 --disk-path "$DISK" \
    --out "$OUT/ttft.json" 2>&1 | tee "$OUT/ttft.txt"
