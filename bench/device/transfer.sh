#!/usr/bin/env bash
# kvtier copy engine on the GPU machine: GPU tests, threshold sweep, `kvtier bench transfer`.
# Run from the repository root:  OUT=/some/dir bash bench/device/transfer.sh
# (PAGES=N changes the pages per bench job, default 512; PYTHON picks the interpreter;
#  SWEEP=1 re-measures the Triton/DMA thresholds first, about 30 s; ALL=1 also benches the
#  variants already measured in earlier runs: triton grids, mixed paths, engine dma.)
# Each bench writes its JSON after every measured step, so a part cut short keeps its rows.
# Everything lands under $OUT; a summary table is printed last. Each part runs even when an
# earlier one fails; the exit code is non-zero if any part failed (a wrong byte fails loudly).
set -u
OUT="${OUT:-$PWD/out-transfer}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
status=()
fail=0

part() {  # part NAME TIMEOUT CMD...
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  echo "=== $name: $*" | tee -a "$OUT/transfer.log"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  tail -n 40 "$OUT/$name.txt" >> "$OUT/transfer.log"
  status+=("$(printf '%-28s rc=%-4s %4ss' "$name" "$rc" "$((SECONDS - t0))")")
  [ "$rc" -ne 0 ] && fail=1
  return 0
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
  echo "${KVTIER_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"; date -u +%FT%TZ; } > "$OUT/env.txt" 2>&1
"$PY" -m pip install -e . --no-deps --no-build-isolation -q > "$OUT/install.txt" 2>&1 || echo "pip install -e failed (see install.txt); using PYTHONPATH" >> "$OUT/install.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"


summarize() {  # summary.txt from whatever bench JSON exists (re-run after every part)
"$PY" - "$OUT" <<'PYEOF' > "$OUT/summary.txt" 2>&1
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print(f"{'geometry':18} {'item':>6} {'what':34} {'store':>10} {'load':>10} {'both':>10} {'load/layer':>10}  (GB/s/ratio to ceiling)")
for f in sorted(out.glob("bench-*.json")):
    try:
        r = json.loads(f.read_text())
    except ValueError:
        print(f"{f.name}: no JSON (see {f.with_suffix('.txt').name})"); continue
    m, c = r["meta"], r["ceiling"]
    if r.get("mode") != "gpu":
        print(f"{m['geometry']:18} {m['item_bytes']:>6} (no GPU) cpu path vs memcpy: {json.dumps(r.get('ratios'))}")
        continue
    print(f"{m['geometry'] + '/' + r.get('slots', 'random'):18} {m['item_bytes']:>6} {'ceiling d2h/h2d/bidir':34} {c['d2h']:10.1f} {c['h2d']:10.1f} {c['bidir']:10.1f}")
    for name, ops in r.get("baselines", {}).items():
        rat = r["baseline_ratios"][name]
        cell = lambda op: f"{ops[op]:5.1f}/{rat[op]:.2f}" if op in ops else "      -"
        print(f"{'':18} {'':>6} {name[:34]:34} {cell('store'):>10} {cell('load'):>10}")
    for name, ops in r.get("engine", {}).items():
        rat = r["ratios"][name]
        cell = lambda op: f"{ops[op]:5.1f}/{rat[op]:.2f}" if op in ops else "      -"
        print(f"{'':18} {'':>6} {('engine ' + name)[:34]:34} {cell('store'):>10} {cell('load'):>10} {cell('both'):>10} {cell('load_layerwise'):>10}")
    for name, t in r.get("both_timeline_ms", {}).items():
        print(f"{'':18} {'':>6} {('both ' + name)[:34]:34} submit store/load {t['submit_store_ms']:.2f}/{t['submit_load_ms']:.2f} ms, gpu store/load {t['store_gpu_ms']:.1f}/{t['load_gpu_ms']:.1f} ms, wall {t['both_wall_ms']:.1f} ms")
    for name, ops in r.get("conversion", {}).items():
        rat = r["conversion_ratios"][name]
        cells = "  ".join(f"{k} {v:.0f}/{rat[k]:.2f}" for k, v in ops.items())
        print(f"{'':18} {'':>6} {('convert ' + name)[:34]:34} {cells} (vs device copy {c['device_copy']:.0f})")
    for name, err in r.get("errors", {}).items():
        print(f"{'':18} {'':>6} {name} FAILED: {err[:90]}")
PYEOF
}

# the staged DMA path and auto first; the known slow variants only with ALL=1
FAST_PATHS=auto,auto+threads,staged-batch,staged-batch+threads,staged,triton,torch
ALL_PATHS="$FAST_PATHS,staged-batch-b3,staged-c8m,staged-c64m,store-staged+load-triton,dma,triton-grid-full,triton-cta2,triton-cta8,store-triton+load-torch,store-torch+load-triton"
if [ "${ALL:-0}" = 1 ]; then PATHS="$ALL_PATHS"; else PATHS="${PATHS:-$FAST_PATHS}"; fi
part gpu-tests "${TEST_LIMIT:-100}" "$PY" -m pytest -m gpu tests/transfer/test_transfer_gpu.py -q -p no:cacheprovider --timeout 90 -o addopts="" -rfE
if [ "${SWEEP:-0}" = 1 ]; then
  part sweep 120 "$PY" bench/device/transfer_sweep.py "$OUT"
  # the engine's "auto" path in the benches below uses the freshly measured thresholds
  if [ -s "$OUT/thresholds.json" ]; then cp "$OUT/thresholds.json" kvtier/transfer/thresholds.json; fi
fi
# the goal geometry first; the bench writes bench-$geo.json after every step (--out).
# GEOS picks geometries; SLOTS="random pool" also measures jobs whose host slots are what the
# pool allocates (ascending runs) next to random ones (bench-$geo-pool.json).
for geo in ${GEOS:-llama3-8b llama3-70b-tp8 llama3-70b-tp4 deepseek-v3-mla}; do
  for slots in ${SLOTS:-random}; do
    name="bench-$geo"; [ "$slots" = random ] || name="bench-$geo-$slots"
    conv=--sweep-convert; [ "$slots" = random ] || conv=
    part "$name" 110 "$PY" -m kvtier.cli.main bench transfer --geometry "$geo" \
      --pages "${PAGES:-512}" --reps "${REPS:-7}" --paths "$PATHS" $conv --slots "$slots" \
      --out "$OUT/$name.json"
    summarize
  done
done

summarize
cat "$OUT/summary.txt"
echo "--- sweep (item bytes, job, op, best Triton GB/s, DMA GB/s)"
tail -n 40 "$OUT/sweep.txt" 2>/dev/null | grep -E "^ +[0-9]|thresholds" || echo "(no sweep output)"
echo "--- gpu tests"; tail -n 3 "$OUT/gpu-tests.txt" 2>/dev/null
echo "--- parts"; printf '%s\n' "${status[@]}"
exit $fail
