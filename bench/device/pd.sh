#!/usr/bin/env bash
# kvtier bench pd on a 2-GPU machine: request KV over NIXL (UCX cuda_ipc) GPU0 -> GPU1 against
# the same run's peer copy, plus the NIXL transfer tests (GPU ones included).
# Run from the repository root, with the nixl-cu13 wheel in .whl/ (carry ".whl"):
#   bash bench/device/pd.sh
# KVTIER_COMMIT=<sha> names the commit in the results where the tree has no .git.
# Results land in $OUT: pd-cuda-<date>.json/.md, tests.log, bench.log, topo.txt.
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
timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/transfer/test_registration.py \
    tests/transfer/test_handshake.py tests/transfer/test_nixl_transport.py 2>&1 \
    | grep -v "NIXL INFO" | tee "$OUT/tests.log"
if ! grep -q " passed" "$OUT/tests.log" || grep -q -E "[0-9]+ (failed|error)" "$OUT/tests.log"
then echo "pd.sh: tests failed" >&2; exit 1; fi
if grep -q "needs 2 CUDA GPUs" "$OUT/tests.log"; then echo "pd.sh: GPU tests skipped" >&2; exit 1; fi

# the bench module directly: the CLI would import every benchmark and its dependencies
timeout 120 python3 -m kvtier.cli.bench_pd --device cuda --tokens 8192 --repeat 8 \
    --save "$OUT" 2>&1 | grep -v "NIXL INFO" | tee "$OUT/bench.log"
# the summary table last
cat "$OUT"/pd-cuda-*.md
