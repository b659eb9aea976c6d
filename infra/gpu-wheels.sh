#!/usr/bin/env bash
# The wheels infra/bench-gpu.sh installs, offline, on a GPU machine whose image has torch but not the rest
# (`make gpu-wheels`). Run it where pip reaches the package index; it writes $WHEELS (default
# .gpu-wheels/, ignored by git) for CPython $GPU_PYTHON (default 3.12) on manylinux x86_64, at the
# versions this checkout's venv runs, so the GPU runs what the tests ran. Carry that folder to the
# machine beside the checkout; bench-gpu.sh's first step installs it with --no-index.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${WHEELS:-.gpu-wheels}
GPU_PYTHON=${GPU_PYTHON:-3.12}
# What GPU images with PyTorch lack: DeepSpeed and its config parsers, the loader's WebDataset. They do
# carry torch, numpy, pillow, pyyaml, fsspec, ninja, psutil, py-cpuinfo, msgpack, einops, packaging.
PACKAGES=(deepspeed hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions
          webdataset braceexpand)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

pins=()
for name in "${PACKAGES[@]}"; do
    version=$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name" 2> /dev/null) || {
        echo "gpu-wheels: $name is not installed in $PY's environment: run 'make install' first" >&2
        exit 2
    }
    pins+=("$name==$version")
done

rm -rf "$OUT"
mkdir -p "$OUT"
target=(--only-binary=:all: --no-deps --python-version "$GPU_PYTHON" --implementation cp)
for p in "${PLATFORMS[@]}"; do target+=(--platform "$p"); done
# DeepSpeed is published as a source distribution: build its wheel here, pure Python, no ops compiled
# (DeepSpeed JIT-builds an op when one is used; vitscale uses torch's AdamW and needs none).
if ! "$PY" -m pip download -q "${target[@]}" -d "$OUT" "${pins[0]}" 2> /dev/null; then
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w "$OUT" "${pins[0]}"
fi
"$PY" -m pip download -q "${target[@]}" -d "$OUT" "${pins[@]:1}"
# a pure-Python wheel built here is tagged py3-none-any; anything else must be for the GPU's Python
ls "$OUT"/*.whl | sed 's|.*/||'
echo "gpu-wheels: $(ls "$OUT"/*.whl | wc -l) wheels in $OUT/ for CPython $GPU_PYTHON ($(du -sh "$OUT" | cut -f1))"
