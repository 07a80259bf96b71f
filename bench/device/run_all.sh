#!/usr/bin/env bash
# Run several device scripts in one lease, each under its own time limit, and pack what they
# write into $OUT/results.tgz (the device tool brings back only a few files).
#   OUT=/dir bash bench/device/run_all.sh layouts:90 transfer:280 ttft:200 vmm:200 pd:200
set -u
OUT=${OUT:-/tmp/kvtier-device}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
WORK="$OUT/work"
mkdir -p "$WORK"
{ date -u +%FT%TZ; echo "${KVTIER_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'; } \
  > "$WORK/env.txt" 2>&1
python3 -m pip install -e . --no-deps --no-build-isolation -q > "$WORK/pip.txt" 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
summary=()
for spec in "$@"; do
  name=${spec%%:*}; limit=${spec##*:}
  mkdir -p "$WORK/$name"
  t0=$SECONDS
  case $name in
    layouts) cmd=(python3 bench/device/layouts_gpu.py) ;;
    *) cmd=(bash "bench/device/$name.sh") ;;
  esac
  OUT="$WORK/$name" timeout -k 10 "$limit" "${cmd[@]}" > "$WORK/$name/stdout.txt" 2>&1
  rc=$?
  summary+=("$(printf '%-10s rc=%-4s %4ss' "$name" "$rc" "$((SECONDS - t0))")")
  # bench/device/layouts_gpu.py writes to $OUT itself
done
tar -C "$WORK" -czf "$OUT/results.tgz" .
for name in "$@"; do n=${name%%:*}; echo "=================== $n (tail)"; tail -n 25 "$WORK/$n/stdout.txt"; done
echo "=================== parts"; printf '%s\n' "${summary[@]}"
rm -rf "$WORK"
