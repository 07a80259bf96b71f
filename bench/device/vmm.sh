#!/usr/bin/env bash
# Elastic VMM on the device machine (2 NVLink GPUs: nvidia-h200-x2; 1 GPU also works, the peer
# rows are then skipped): the CUDA backend's GPU tests and `kvtier bench vmm --json`.
# Writes under $OUT: env.txt, pytest.txt, bench_vmm.json, bench_vmm.txt. Exit 1 on any failure.
# Usage (repo root): OUT=/some/dir bash bench/device/vmm.sh
set -x
set -o pipefail
OUT=${OUT:-bench/results/vmm-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
status=0

pip install -e . --no-deps --no-build-isolation -q >"$OUT/pip.txt" 2>&1 || { echo "pip install -e . failed"; cat "$OUT/pip.txt"; }

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  git rev-parse HEAD 2>/dev/null || echo "commit unknown"
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
  nvidia-smi topo -m
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
  python -c "import cuda.bindings as b; print('cuda-bindings', getattr(b, '__version__', '?'))" \
    || python -c "import cuda; print('cuda-python (old layout)')"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if python -c "import pytest" 2>/dev/null; then
  timeout 150 python -m pytest -q -x -p no:cacheprovider -o addopts="-ra" \
      tests/memory/test_vmm_cuda_gpu.py 2>&1 | tee "$OUT/pytest.txt" || status=1
  grep -q "passed" "$OUT/pytest.txt" || { echo "GPU tests did not run" | tee -a "$OUT/pytest.txt"; status=1; }
  if python -c "import hypothesis" 2>/dev/null; then
    timeout 60 python -m pytest -q -x -p no:cacheprovider -o addopts="" \
        tests/memory/test_elastic_sim.py 2>&1 | tee -a "$OUT/pytest.txt" || status=1
  fi
else
  echo "pytest missing: GPU tests not run (the bench below still checks data)" | tee "$OUT/pytest.txt"
fi

timeout 240 python -m kvtier bench vmm --json >"$OUT/bench_vmm.json" 2>"$OUT/bench_vmm.err" || {
  status=1; echo "bench vmm failed:"; cat "$OUT/bench_vmm.err"; }

python - "$OUT" <<'PY' || status=1
import json, pathlib, sys
from kvtier.cli.bench_vmm import format_table
out = pathlib.Path(sys.argv[1])
data = json.loads((out / "bench_vmm.json").read_text())
text = format_table(data["rows"])
(out / "bench_vmm.txt").write_text(text + "\n")
print(text)
PY
echo "vmm.sh status=$status"
exit $status
