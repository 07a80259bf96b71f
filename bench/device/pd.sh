#!/usr/bin/env bash
# kvtier bench pd on a 2-GPU machine: request KV over NIXL (UCX cuda_ipc) GPU0 -> GPU1 against
# the same run's peer copy, plus the NIXL transfer tests (GPU ones included).
# Run from the repository root, with the nixl-cu13 wheel in .whl/ (carry ".whl"):
#   bash bench/device/pd.sh
# KVTIER_COMMIT=<sha> names the commit in the results where the tree has no .git.
# Results land in $OUT: pd-cuda-w<workers>-<date>.json/.md, -rows.jsonl, tests.log,
# bench-w<workers>.log, topo.txt.
set -euo pipefail
OUT=${OUT:-/tmp/kvtier-pd}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/nixl*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/nixl*.whl
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 - <<'PY'
import torch
from kvtier.transfer.nixl_transport import load_nixl
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())
print("nixl", load_nixl().__name__)
assert torch.cuda.device_count() >= 2, "bench pd needs 2 GPUs (nvidia-h200-x2)"
PY
nvidia-smi topo -m >"$OUT/topo.txt" 2>&1 || true

# tests first: a wrong byte fails the run before any number is reported
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/transfer/test_registration.py \
    tests/transfer/test_handshake.py tests/transfer/test_nixl_transport.py 2>&1 \
    | grep -v "NIXL INFO" | tee "$OUT/tests.log"
# a test failure fails the script at the end; the bench still runs (it verifies its own bytes)
status=0
if ! grep -q " passed" "$OUT/tests.log" || grep -q -E "[0-9]+ (failed|error)" "$OUT/tests.log"
then echo "pd.sh: tests failed" >&2; status=1; fi
if grep -q "needs 2 CUDA GPUs" "$OUT/tests.log"; then echo "pd.sh: GPU tests skipped" >&2; status=1; fi

# the bench module directly: the CLI would import every benchmark and its dependencies.
# Two runs: one UCX worker per agent, then 4 (parts in flight spread over workers). Each row
# lands in pd-cuda-w<N>-rows.jsonl as soon as it is measured, so a failure keeps earlier rows.
for workers in 1 4; do
    timeout -k 5 80 python3 -m kvtier.cli.bench_pd --device cuda --tokens 8192 --repeat 8 \
        --parts 1,4 --workers "$workers" --save "$OUT" 2>&1 | grep -v "NIXL INFO" \
        | tee "$OUT/bench-w$workers.log" || { echo "pd.sh: bench with $workers workers failed" >&2
                                              status=1; }
done
# the summary table last (rows of a run that did not finish, if any)
for workers in 1 4; do
    if compgen -G "$OUT/pd-cuda-w$workers-2*.md" >/dev/null; then cat "$OUT"/pd-cuda-w$workers-2*.md
    else echo "## workers=$workers: partial rows"; cat "$OUT/pd-cuda-w$workers-rows.jsonl" 2>/dev/null
    fi
done
exit $status
