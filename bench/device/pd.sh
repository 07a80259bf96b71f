#!/usr/bin/env bash
# kvtier bench pd on a 2-GPU machine: request KV over NIXL (UCX cuda_ipc) GPU0 -> GPU1 against
# the same run's peer copy (one 1 GiB copy, and the same descriptors as one copy each), plus
# the NIXL transfer tests (GPU ones included).
# Run from the repository root, with the nixl-cu13 wheel in .whl/ (carry ".whl"):
#   bash bench/device/pd.sh
# KVTIER_COMMIT=<sha> names the commit in the results where the tree has no .git.
# Results land in $OUT: pd-cuda-<variant>-<date>.json/.md, -rows.jsonl, tests.log,
# bench-<variant>.log (UCX protocol selection included), topo.txt.
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

# tests first: a wrong byte fails the run before any number is reported (TESTS=0 skips them
# for a re-measure of code whose tests already passed here; the bench still checks its bytes)
status=0
if [ "${TESTS:-1}" != 0 ]; then
    timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/transfer/test_registration.py \
        tests/transfer/test_handshake.py tests/transfer/test_nixl_transport.py tests/transfer/test_nixl_packed.py \
        tests/transfer/test_pack_rows.py tests/transfer/test_peer_rows.py \
        tests/transfer/test_nixl_ipc.py 2>&1 \
        | grep -v "NIXL INFO" | tee "$OUT/tests.log" || true
    # a test failure fails the script at the end; the bench still runs (it verifies its own bytes)
    if ! grep -q " passed" "$OUT/tests.log" || grep -q -E "[0-9]+ (failed|error)" "$OUT/tests.log"
    then echo "pd.sh: tests failed" >&2; status=1; fi
    if grep -q "needs 2 CUDA GPUs" "$OUT/tests.log"; then echo "pd.sh: GPU tests skipped" >&2; status=1; fi
fi

# The bench module directly (the CLI would import every benchmark). Variants, each in its own
# process (UCX/NIXL read these once): "base" = kvtier's UCX defaults, with UCX_PROTO_INFO so the
# log names the protocol and transport used, at 8K and 32K tokens (a long prompt is what a
# disaggregated deployment moves); "sgl" = NIXL_UCX_SGL_ENABLE=1 (one cuMemcpyBatchAsync per
# transfer); every variant also measures packed transfers (gather into staging slots of the
# given size, one descriptor per slot, scatter). Each row lands in pd-cuda-<variant>-rows.jsonl as measured.
run_bench() {  # name, tokens, time limit, packed slot MiB, extra bench args, env assignments...
    local name=$1 tokens=$2 limit=$3 slot=$4 extra=$5; shift 5
    # shellcheck disable=SC2086  # $extra is a list of options
    env "$@" timeout -k 5 "$limit" python3 -m kvtier.cli.bench_pd --device cuda \
        --tokens "$tokens" --repeat 8 --parts 1 --workers 1 --slot-mib "$slot" $extra \
        --save "$OUT/$name" \
        >"$OUT/bench-$name.log" 2>&1 \
        || { echo "pd.sh: bench $name failed (see bench-$name.log)" >&2; status=1; }
    grep "^pd" "$OUT/bench-$name.log" || true
}
# -pN: the packed gather/scatter kernels on at most N programs per SM (kvtier's default is 8),
# to see how much the copy engines' NVLink writes suffer from kernels saturating HBM beside them
VARIANTS=${VARIANTS:-"base-8k base-32k sgl-8k"}
for v in $VARIANTS; do
    case $v in
        base-8k) run_bench base-8k 8192 80 64 "" UCX_PROTO_INFO=y ;;
        base-32k) run_bench base-32k 32768 200 64 "" ;;
        s128-8k) run_bench s128-8k 8192 110 128 "" ;;
        s32-8k) run_bench s32-8k 8192 80 32 "" ;;
        s256-8k) run_bench s256-8k 8192 150 256 "" ;;
        s256-8k-p*) p=${v#s256-8k-p}; run_bench "$v" 8192 60 256 \
            "--modes request,packed --pack-programs ${p/_/.}" ;;
        ipc-p*) p=${v#ipc-p}; run_bench "$v" 8192 60 256 "--modes ipc --ipc-programs ${p/_/.}" ;;
        ipcs-p*) p=${v#ipcs-p}; run_bench "$v" 8192 60 256 \
            "--modes ipc --ipc-spread --ipc-programs ${p/_/.}" ;;
        ipcd-p*) p=${v#ipcd-p}; run_bench "$v" 8192 60 256 \
            "--modes ipc --ipc-direct --ipc-programs ${p/_/.}" ;;
        sgl-8k) run_bench sgl-8k 8192 80 64 "" NIXL_UCX_SGL_ENABLE=1 ;;
        *) echo "pd.sh: unknown variant $v" >&2; status=1 ;;
    esac
done
grep -E "cuda_ipc|put|PUT" "$OUT/bench-base-8k.log" 2>/dev/null | grep -v "^pd" | head -20 || true
# the summary table last (rows of a run that did not finish, if any)
for name in $VARIANTS; do
    echo "## variant $name"
    if compgen -G "$OUT/$name/pd-cuda-w1-2*.md" >/dev/null; then cat "$OUT"/$name/pd-cuda-w1-2*.md
    else echo "partial rows:"; cat "$OUT/$name/pd-cuda-w1-rows.jsonl" 2>/dev/null || true
    fi
done
exit $status
