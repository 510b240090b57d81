#!/usr/bin/env bash
# Creates ./.venv with a CPU torch and builds genie_fast (with its C++ extension) into it.
# On a machine with a CUDA torch already installed, skip this and run
#   pip install --no-build-isolation -e .
set -euo pipefail
cd "$(dirname "$0")"
. ./tested_versions.env  # the tested torch / triton versions
VENV=${GENIE_FAST_VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# torch pinned: an unpinned torch would pull a multi-GB CUDA build.
$PIP install -q "torch==$GENIE_FAST_TORCH_CPU" "triton==$GENIE_FAST_TRITON"
# the build runs without isolation (it must see torch), so its tools are installed here
$PIP install -q numpy pytest safetensors tqdm nvtx matplotlib pillow setuptools wheel "cmake>=3.26" ninja
# the optional diffusers extra, so its tests run too (diffusers does not depend on torch)
$PIP install -q "diffusers==0.42.1"
$PIP install -q --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c "import genie_fast, genie_fast._ext as e; print('genie_fast', genie_fast.__version__, '| C++ ops:', e._C is not None)"
