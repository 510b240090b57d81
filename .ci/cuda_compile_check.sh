#!/usr/bin/env bash
# Compile and link genie_fast._C WITH its CUDA sources (csrc/cuda/*.cu) for sm_90 on a machine
# without a GPU, against the torch the kernels will meet: the lent H200 runs torch 2.11.0+cu130
# (CUDA 13, like this machine's nvcc 13.0), and PyPI's plain torch==2.11.0 for Linux x86-64 is
# that CUDA 13.0 build. So a syntax, ABI or link error in a .cu file fails CI instead of a GPU call.
# Then the same CUDA torch WITHOUT the CUDA kernels (GENIE_FAST_CUDA=OFF, CUDA_HOME pointing
# nowhere): the fallback build of bench/gpu_check.sh, which must not need the CUDA toolkit.
# Each built module is loaded (no GPU needed for that) and its ops' kernels are listed.
#
# CUDA_TORCH_VERSIONS (default: GENIE_FAST_TORCH_CUDA of tested_versions.env, 2.11.0; e.g.
# "2.11.0 2.14.1" for a newer torch too): one venv per version, $CUDA_VENV_PREFIX<version>
# (default /tmp/cuda-venv-torch2.11.0, ~5 GB, made once in a few minutes and reused). Builds go to throwaway folders: the main venv and the in-tree
# editable genie_fast/_C*.so are not touched. Nothing built here runs a kernel.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GENIE_FAST_TORCH_CUDA=2.11.0
[ -f "$ROOT/tested_versions.env" ] && . "$ROOT/tested_versions.env"  # the one place pinning versions
VERSIONS="${CUDA_TORCH_VERSIONS:-$GENIE_FAST_TORCH_CUDA}"
PREFIX="${CUDA_VENV_PREFIX:-/tmp/cuda-venv-torch}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"

if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "cuda_compile_check: no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)" >&2
  exit 1
fi
NVCC_MAJOR=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')

WORK="$(mktemp -d /tmp/genie-cuda-build.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

# load_check PYTHON SO WANT_CUDA: the module loads; every op has a CPU kernel, and a CUDA kernel
# exactly when WANT_CUDA=1
load_check() {
  "$1" - "$2" "$3" <<'EOF'
import sys
import torch
so, want_cuda = sys.argv[1], sys.argv[2] == "1"
torch.ops.load_library(so)
# the step ops register only their `_out` form; schedule_table is functional
ops = [f"{op}_out" for op in ("genie_step", "ddim_step", "denoise_step", "dpmpp_2m_step", "genie_multistep_step")]
ops.append("schedule_table")
has = lambda op, key: torch._C._dispatch_has_kernel_for_dispatch_key(f"genie_fast::{op}", key)
bad = [op for op in ops if not has(op, "CPU") or has(op, "CUDA") != want_cuda]
print("  kernels:", {op: [k for k in ("CPU", "CUDA") if has(op, k)] for op in ops})
sys.exit(f"cuda_compile_check: FAILED, wrong kernels for {bad}" if bad else 0)
EOF
}

for v in $VERSIONS; do
  venv="$PREFIX$v"
  if [ "$VERSIONS" = "$v" ] && [ -n "${CUDA_VENV:-}" ]; then venv=$CUDA_VENV; fi  # one version: CUDA_VENV still works
  if ! "$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('$v') and torch.version.cuda else 1)" 2>/dev/null; then
    echo "cuda_compile_check: creating $venv with torch==$v (CUDA build from PyPI; one time, ~1 min)"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "torch==$v" cmake ninja setuptools wheel numpy
  fi
  info=$("$venv/bin/python" -c "import torch; print(torch.__version__, torch.version.cuda)" 2>/dev/null)
  echo "== torch $info (nvcc CUDA $NVCC_MAJOR)"
  case "$info" in *" $NVCC_MAJOR."*) ;; *) echo "cuda_compile_check: note: torch's CUDA differs from nvcc's major version $NVCC_MAJOR";; esac

  # A copy of the sources, so no build artefact lands in the checkout (setup.py's egg-info etc.).
  src="$WORK/src-$v"
  mkdir -p "$src"
  cp -r "$ROOT/csrc" "$ROOT/genie_fast" "$ROOT/kernels" "$ROOT/CMakeLists.txt" "$ROOT/setup.py" \
    "$ROOT/pyproject.toml" "$src/"
  [ -f "$ROOT/README.md" ] && cp "$ROOT/README.md" "$src/"
  rm -f "$src/genie_fast/"_C*.so

  # 1. with the CUDA kernels
  start=$(date +%s)
  (cd "$src" && PATH="$venv/bin:$PATH" GENIE_FAST_CUDA=ON "$venv/bin/python" setup.py -q build_ext \
      --build-temp "$WORK/tmp-$v" --build-lib "$WORK/lib-$v")
  so=$(find "$WORK/lib-$v" -name '_C*.so' | head -n1)
  if [ -z "$so" ]; then
    echo "cuda_compile_check: FAILED, no _C*.so was built (torch $v)" >&2
    exit 1
  fi
  # The CUDA kernels must really be in the module, not silently skipped by CMake.
  n_cu=$(ls "$ROOT"/csrc/cuda/*.cu 2>/dev/null | wc -l)
  n_obj=$(find "$WORK/tmp-$v" -name '*.cu.o' | wc -l)
  if [ "$n_obj" -lt "$n_cu" ]; then
    echo "cuda_compile_check: FAILED, $n_cu .cu sources but $n_obj CUDA objects were built (torch $v)" >&2
    exit 1
  fi
  if ! grep -rq -- "code=sm_90" "$WORK/tmp-$v" --include=build.ninja; then
    echo "cuda_compile_check: FAILED, the .cu sources were not compiled for sm_90 (torch $v)" >&2
    exit 1
  fi
  load_check "$venv/bin/python" "$so" 1
  echo "cuda_compile_check: OK, torch $v: $n_obj CUDA objects, sm_90, linked and loaded $(basename "$so") ($(( $(date +%s) - start )) s)"

  # 2. the same CUDA torch without the CUDA kernels and without a toolkit in sight (no nvcc on
  # PATH, CUDA_HOME nowhere; /usr/local/cuda itself stays, which torch's config would still find)
  if env PATH="$venv/bin:/usr/sbin:/usr/bin:/sbin:/bin" bash -c 'command -v nvcc' >/dev/null; then
    echo "cuda_compile_check: note: nvcc is still on the reduced PATH"
  fi
  start=$(date +%s)
  rm -rf "$src"/build "$src"/*.egg-info
  (cd "$src" && env GENIE_FAST_CUDA=OFF CUDA_HOME=/nonexistent CUDA_PATH=/nonexistent \
      PATH="$venv/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
      "$venv/bin/python" setup.py -q build_ext --build-temp "$WORK/tmp-off-$v" --build-lib "$WORK/lib-off-$v")
  so=$(find "$WORK/lib-off-$v" -name '_C*.so' | head -n1)
  cache=$(find "$WORK/tmp-off-$v" -name CMakeCache.txt | head -n1)
  if [ -z "$so" ] || [ "$(find "$WORK/tmp-off-$v" -name '*.cu.o' | wc -l)" != 0 ]; then
    echo "cuda_compile_check: FAILED, the GENIE_FAST_CUDA=OFF build (torch $v) made no module or built .cu files" >&2
    exit 1
  fi
  if grep -q "^CUDAToolkit_\|^CUDA_TOOLKIT_ROOT_DIR\|^Torch_DIR" "$cache"; then
    echo "cuda_compile_check: FAILED, the GENIE_FAST_CUDA=OFF build (torch $v) went through torch's CUDA config" >&2
    exit 1
  fi
  load_check "$venv/bin/python" "$so" 0
  echo "cuda_compile_check: OK, torch $v with GENIE_FAST_CUDA=OFF and no toolkit: CPU kernels only, loaded ($(( $(date +%s) - start )) s)"
done
