#!/usr/bin/env bash
# Compile and link genie_fast._C WITH its CUDA sources (csrc/cuda/*.cu) for sm_90, on a machine
# without a GPU, so a syntax or link error in a .cu file fails CI instead of waiting for a GPU.
#
# Uses a separate venv with the local CUDA torch (torch==2.14.1, ~5.5 GB, made once and reused):
# $CUDA_VENV, default /tmp/cuda-venv. Builds into a throwaway directory: the main venv and the
# in-tree editable genie_fast/_C*.so are not touched. Nothing built here is run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CUDA_VENV="${CUDA_VENV:-/tmp/cuda-venv}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export GENIE_FAST_CUDA=ON

if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "cuda_compile_check: no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)" >&2
  exit 1
fi

if ! "$CUDA_VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  echo "cuda_compile_check: creating $CUDA_VENV with the CUDA torch (one time, ~1 min)"
  python3 -m venv "$CUDA_VENV"
  "$CUDA_VENV/bin/pip" install -q torch==2.14.1 cmake ninja setuptools wheel numpy
fi

WORK="$(mktemp -d /tmp/genie-cuda-build.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
# A copy of the sources, so no build artefact lands in the checkout (setup.py's egg-info etc.).
mkdir -p "$WORK/src"
cp -r "$ROOT/csrc" "$ROOT/genie_fast" "$ROOT/kernels" "$ROOT/CMakeLists.txt" "$ROOT/setup.py" \
  "$ROOT/pyproject.toml" "$WORK/src/"
[ -f "$ROOT/README.md" ] && cp "$ROOT/README.md" "$WORK/src/"
rm -f "$WORK/src/genie_fast/"_C*.so
cd "$WORK/src"
start=$(date +%s)
"$CUDA_VENV/bin/python" setup.py -q build_ext --build-temp "$WORK/tmp" --build-lib "$WORK/lib"
so=$(find "$WORK/lib" -name '_C*.so' | head -n1)
if [ -z "$so" ]; then
  echo "cuda_compile_check: FAILED, no _C*.so was built" >&2
  exit 1
fi
# The CUDA kernels must really be in the module, not silently skipped by CMake.
n_cu=$(ls "$ROOT"/csrc/cuda/*.cu 2>/dev/null | wc -l)
n_obj=$(find "$WORK/tmp" -name '*.cu.o' | wc -l)
if [ "$n_obj" -lt "$n_cu" ]; then
  echo "cuda_compile_check: FAILED, $n_cu .cu sources but $n_obj CUDA objects were built" >&2
  exit 1
fi
if ! grep -rq -- "code=sm_90" "$WORK/tmp" --include=build.ninja; then
  echo "cuda_compile_check: FAILED, the .cu sources were not compiled for sm_90" >&2
  exit 1
fi
echo "cuda_compile_check: OK, $n_obj CUDA objects, sm_90, linked $(basename "$so") ($(( $(date +%s) - start )) s)"
