#!/usr/bin/env bash
# Fetch the NIXL wheel for the GPU image (python 3.12, CUDA 13 torch) into .whl/ and strip the
# parts kvtier does not use (nixl_ep expert-parallel kernels, C++ headers), 56 -> 29 MiB, so it
# fits the device machine's carry limit. Run here, from the repository root; pd.sh installs it.
set -euo pipefail
mkdir -p .whl /tmp/nixl-wheel
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d /tmp/nixl-wheel nixl-cu13==1.5.1
python3 - <<'PY'
import pathlib, zipfile

src = next(pathlib.Path("/tmp/nixl-wheel").glob("nixl_cu13-1.5.1-*.whl"))
dst = pathlib.Path(".whl") / src.name


def drop(name: str) -> bool:
    return name.startswith("nixl_ep_cu13/") or "/include/" in name or name.endswith(".a")


with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zo:
    for info in zi.infolist():
        if drop(info.filename):
            continue
        data = zi.read(info.filename)
        if info.filename.endswith(".dist-info/RECORD"):
            keep = [ln for ln in data.decode().splitlines() if not drop(ln.split(",")[0])]
            data = ("\n".join(keep) + "\n").encode()
        zo.writestr(info, data)
print(f"{dst}: {dst.stat().st_size >> 20} MiB (from {src.stat().st_size >> 20} MiB)")
PY
