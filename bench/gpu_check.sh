#!/usr/bin/env bash
# The one GPU check of the sampling engine (see ../shared/GPU.md): about 6 minutes on an H100/H200.
#
#   bash bench/gpu_check.sh                 # on the lent GPU machine, from the repository root
#   GPU_CHECK_SKIP_INSTALL=1 bash bench/gpu_check.sh   # here on the CPU: every GPU part skips
#
# Steps, each with its own time limit, logs and JSON under $OUT (default ./out/gpu_check):
#   1. offline editable install (builds the CUDA extension where nvcc and a CUDA torch exist)
#   2. card, driver, torch, triton, CUDA, cuDNN, nvcc, ncu, nsys versions
#   3. the engine's CUDA-marked tests (pytest -m cuda); the rest of the suite's come last (step 7)
#   4. engine agreement: fp16 graph vs fp32 eager (TF32 off) within the measured bound, graph vs
#      eager with the same kernels (bench/profile_sample.py --check), deep U-Net and a small one
#   5. NVTX ranges seen by a profiler: nsys if on the PATH, else Nsight Compute's NVTX filter
#      (a genie_fast range must select kernels, a made-up range must select none)
#   6. the latency benchmark (bench/bench_sample.py) with what is left of the time budget
#   7. the other CUDA-marked tests of the suite
# A short summary table is printed last. The script never stops at a failed step: it records it.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out/gpu_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package imports from this tree even if the install fails
PY="${PYTHON:-python3}"
TOTAL_S="${GPU_CHECK_TOTAL_S:-360}"
START=$SECONDS
declare -A STATUS

left() { echo $(( TOTAL_S - (SECONDS - START) )); }
step() {  # step NAME LIMIT_S CMD...: run with a time limit, log to $OUT/NAME.log, keep the status
    local name=$1 limit=$2; shift 2
    local cap=$(( $(left) - 20 ))          # never run past the total (the benchmark still needs >= 60 s)
    case $name in bench|tests_other) ;; *) cap=$(( cap - 60 ));; esac
    [ "$cap" -lt 20 ] && cap=20
    [ "$limit" -gt "$cap" ] && limit=$cap
    echo "=== $name (limit ${limit}s, $(left)s of ${TOTAL_S}s left) ==="
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    STATUS[$name]=$rc
    [ "$rc" = 124 ] && echo "[$name] stopped at its ${limit}s limit"
    return 0
}

HAS_CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
echo "gpu_check: CUDA available: $HAS_CUDA; logs under $OUT"

# 1. install without network (no build isolation: torch comes from the environment)
if [ "${GPU_CHECK_SKIP_INSTALL:-0}" = 1 ]; then
    echo "=== install skipped (GPU_CHECK_SKIP_INSTALL=1) ==="; STATUS[install]=skipped
else
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
    step install 240 $PY -m pip install --no-build-isolation --no-deps -e .
    if [ "${STATUS[install]}" != 0 ]; then  # keep the engine checkable: CPU ops only, PyTorch refs on the GPU
        echo "install with CUDA failed (see $OUT/install.log): retrying with GENIE_FAST_CUDA=OFF"
        GENIE_FAST_CUDA=OFF step install_nocuda 120 $PY -m pip install --no-build-isolation --no-deps -e .
    fi
fi

# 2. versions
step versions 60 bash -c "
  (nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || echo 'nvidia-smi: none') 2>&1
  $PY - <<'EOF'
import torch, platform
print('python', platform.python_version(), '| torch', torch.__version__, '| CUDA', torch.version.cuda,
      '| cuDNN', torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
try:
    import triton; print('triton', triton.__version__)
except ImportError:
    print('triton: none')
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('device', p.name, 'sm', f'{p.major}.{p.minor}', 'SMs', p.multi_processor_count, 'mem GiB', round(p.total_memory / 2**30, 1))
import genie_fast, genie_fast._ext as e
print('genie_fast', genie_fast.__version__, '| _C loaded:', e._C is not None)
import nvtx; print('nvtx package present')
EOF
  for tool in nvcc ncu nsys; do
    if command -v \$tool >/dev/null; then echo \"\$tool: \$(\$tool --version 2>&1 | tail -1)\"; else echo \"\$tool: none on PATH\"; fi
  done
"

# 3. the engine's CUDA-marked tests (they skip cleanly without a GPU); the rest of the suite's in step 7
step tests 100 $PY -m pytest -m cuda -q -rs -p no:cacheprovider tests/test_engine.py \
    --junitxml="$OUT/tests_junit.xml"

# 4. agreement checks, printed as JSON lines
step check 90 bash -c "$PY bench/profile_sample.py --check --model fmnist_small --batch 8 --nfe 10 &&
                       $PY bench/profile_sample.py --check --model deep --batch 4 --nfe 10"

# 5. NVTX ranges seen by a profiler
nvtx_check() {
    if [ "$HAS_CUDA" != 1 ]; then echo "NVTX: no GPU here, no profiler run (ranges are no-ops)"; return 0; fi
    local run="$PY bench/profile_sample.py --model tiny --batch 2 --nfe 3 --iters 1 --mode both"
    if command -v nsys >/dev/null; then
        nsys profile -t cuda,nvtx --capture-range=cudaProfilerApi -f true -o "$OUT/nvtx_nsys" $run &&
        nsys stats --report nvtx_sum --format csv "$OUT/nvtx_nsys.nsys-rep" | tee "$OUT/nvtx_sum.csv" &&
        grep -q "sample" "$OUT/nvtx_sum.csv" && echo "NVTX: nsys saw the genie_fast ranges" && return 0
        echo "NVTX: nsys run failed or saw no ranges; trying ncu"
    fi
    if command -v ncu >/dev/null; then
        local base="ncu --nvtx --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --launch-count 5"
        $base --nvtx-include "genie_fast@sample/" $run > "$OUT/nvtx_ncu_sample.txt" 2>&1
        $base --nvtx-include "genie_fast@no_such_range/" $run > "$OUT/nvtx_ncu_control.txt" 2>&1
        $base --nvtx-include "regex:genie_fast@sample/.*replay/" --graph-profiling node $run > "$OUT/nvtx_ncu_replay.txt" 2>&1
        local hit miss rep
        hit=$(grep -c "gpu__time_duration.sum" "$OUT/nvtx_ncu_sample.txt")
        miss=$(grep -c "gpu__time_duration.sum" "$OUT/nvtx_ncu_control.txt")
        rep=$(grep -c "gpu__time_duration.sum" "$OUT/nvtx_ncu_replay.txt")
        echo "NVTX via ncu: kernels selected by genie_fast@sample/: $hit; by a made-up range: $miss; inside replay (regex): $rep"
        grep -m3 "==ERROR==\|==WARNING==" "$OUT"/nvtx_ncu_*.txt
        if [ "$hit" -gt 0 ] && [ "$miss" = 0 ]; then echo "NVTX: ok"; return 0; fi
        echo "NVTX: not shown (see $OUT/nvtx_ncu_*.txt; ncu cannot read counters on some runtimes)"; return 1
    fi
    echo "NVTX: neither nsys nor ncu here: unchecked"; return 1
}
step nvtx 100 bash -c "$(declare -f nvtx_check); OUT='$OUT' PY='$PY' HAS_CUDA='$HAS_CUDA' nvtx_check"

# 6. latency benchmark with the time left but 80 s for step 7 (at least 60 s); its table ends the output
BUDGET=$(( $(left) - 80 )); [ "$BUDGET" -lt 60 ] && BUDGET=60
if [ "$HAS_CUDA" = 1 ]; then
    step bench $(( BUDGET + 60 )) $PY bench/bench_sample.py --budget-s "$BUDGET" --json "$OUT/bench_sample.json"
else
    step bench 300 bash -c "$PY bench/bench_sample.py && $PY bench/bench_sample.py --smoke --json '$OUT/bench_sample.json'"
fi

# 7. the rest of the suite's CUDA-marked tests (kernels, fused solvers), with what is left
step tests_other 90 $PY -m pytest -m cuda -q -rs -p no:cacheprovider tests --ignore=tests/test_engine.py \
    --junitxml="$OUT/tests_other_junit.xml"

echo
echo "=== gpu_check summary ($(( SECONDS - START ))s) ==="
for s in install install_nocuda versions tests tests_other check nvtx bench; do printf '%-9s %s\n' "$s" "${STATUS[$s]:-not run}"; done
grep -h '"check"' "$OUT/check.log" 2>/dev/null | $PY -c "
import json, sys
for line in sys.stdin:
    d = json.loads(line)
    if 'rel_l2' in d:
        print(f\"{d['check']:<26} {d['model']:>13} B={d['batch']:<3} rel L2 {d['rel_l2']:.2e} (bound {d['bound']:.0e}) {'ok' if d['ok'] else 'FAIL'}\")
"
grep -h "^NVTX" "$OUT/nvtx.log" 2>/dev/null
for t in tests tests_other; do
    echo "$t: $(tail -n 1 "$OUT/$t.log" 2>/dev/null)"
done
sed -n '/^times: median/,$p' "$OUT/bench.log" 2>/dev/null
