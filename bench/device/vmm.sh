#!/usr/bin/env bash
# Elastic VMM on the device machine (2 NVLink GPUs: nvidia-h200-x2; 1 GPU also works, the peer
# rows are then skipped): `kvtier bench vmm` first (its numbers are what we came for), then the
# CUDA backend's GPU tests and the simulated allocator tests.
# Writes under $OUT: env.txt, bench_vmm.json (rewritten after every measured row, so a crash or
# timeout keeps what was measured), bench_vmm.txt (the table), bench_vmm.out, bench_vmm.err, pytest.txt. Each step runs
# even if an earlier one failed; exit 1 if any failed. Worst case (every step at its timeout) about 190 s; typically under a minute.
# Usage (repo root): OUT=/some/dir bash bench/device/vmm.sh
set -x
set -o pipefail
OUT=${OUT:-bench/results/vmm-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
status=0
export PYTHONUNBUFFERED=1

pip install -e . --no-deps --no-build-isolation -q >"$OUT/pip.txt" 2>&1 || { echo "pip install -e . failed"; cat "$OUT/pip.txt"; }

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  git rev-parse HEAD 2>/dev/null || echo "commit ${KVTIER_COMMIT:-unknown}"
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
  nvidia-smi topo -m
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'gpus', torch.cuda.device_count())"
  python -c "import cuda.bindings as b; print('cuda-bindings', getattr(b, '__version__', '?'))" \
    || python -c "import cuda; print('cuda-python (old layout)')"
  python -c "import cupy; print('cupy', cupy.__version__)" || echo "cupy missing: views use __cuda_array_interface__"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. the benchmark: every row lands in bench_vmm.json as soon as it is measured
timeout -k 5 90 python -m kvtier bench vmm --out "$OUT/bench_vmm.json" \
    >"$OUT/bench_vmm.out" 2>"$OUT/bench_vmm.err"
rc=$?
if [ $rc -ne 0 ]; then status=1; echo "bench vmm failed (rc=$rc; 124 = timeout):"; tail -n 40 "$OUT/bench_vmm.err"; fi

# 2. GPU tests of the CUDA backend, 3. simulated allocator tests
if python -c "import pytest" 2>/dev/null; then
  timeout -k 5 50 python -m pytest -q -p no:cacheprovider -o addopts="-ra" \
      tests/memory/test_vmm_cuda_gpu.py 2>&1 | tee "$OUT/pytest.txt" || status=1
  grep -q "passed" "$OUT/pytest.txt" || { echo "GPU tests did not run" | tee -a "$OUT/pytest.txt"; status=1; }
  if python -c "import hypothesis" 2>/dev/null; then
    timeout -k 5 30 python -m pytest -q -x -p no:cacheprovider -o addopts="" \
        tests/memory/test_elastic_sim.py tests/memory/test_elastic_describe.py 2>&1 | tee -a "$OUT/pytest.txt" || status=1
  fi
else
  echo "pytest missing: GPU tests not run (the bench above still checks data)" | tee "$OUT/pytest.txt"
fi
# the table last, from the JSON (complete even when the bench process died before printing)
python - "$OUT" <<'PY' || status=1
import json, pathlib, sys
from kvtier.cli.bench_vmm import format_table
out = pathlib.Path(sys.argv[1])
data = json.loads((out / "bench_vmm.json").read_text())
text = format_table(data["rows"])
(out / "bench_vmm.txt").write_text(text + "\n")
print(text)
print("bench vmm failed sections:", ", ".join(data.get("failed") or []) or "none")
sys.exit(1 if data.get("failed") else 0)
PY
echo "vmm.sh status=$status"
exit $status
