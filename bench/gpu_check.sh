#!/usr/bin/env bash
# The one prepared GPU check of genie_fast: the headline GPU figures in ONE call of about 300 s on
# a bare H200 (one NVIDIA H200, 16 CPU cores, Python 3.12, torch 2.11.0+cu130, triton 3.6.0,
# nvcc 13.0; no nvtx Python package, no Nsight Systems, ncu reads counters on some of those
# machines only; no network). Everything also runs here on a CPU, with the GPU parts skipped.
#
#   bash bench/gpu_check.sh                  # first call: every step, in the order below
#   bash bench/gpu_check.sh --rerun          # only the steps that failed, timed out or did not run
#                                            # in the last call (state in out/gpu_check_state/,
#                                            # kept on a warm machine; without it: every step)
#   bash bench/gpu_check.sh bench profile    # only the named steps
#   bash bench/gpu_check.sh --plan [...]     # print what would run, with its limits, and exit
#
# Device tool: run(command="bash bench/gpu_check.sh", timeout_s=420) for the first call; a rerun
# on the still-warm machine (30 s) or a fresh one: run(command="bash bench/gpu_check.sh --rerun")
# or name the steps. The build is skipped whenever genie_fast._C already imports with every op's
# kernels for this machine's devices (a warm machine), unless its sources changed since the
# build this script made (a stamp in the state folder) or `install` is named.
#
# TIME PLAN on a bare H200 (seconds; a step never runs past its cap nor past what the total leaves
# the steps after it; what the bench does not reach is listed as skipped, never lost):
#   step          plan   cap   what
#   install         90   150   offline editable install: CMake builds genie_fast._C with its CUDA
#                              kernels (sm_90, 16 jobs); if that fails, again with GENIE_FAST_CUDA=OFF
#                              (Triton then runs the steps); skipped when the extension is ready
#   versions         5    20   card, driver, torch, triton, CUDA, cuDNN, nvcc, ncu; the backend that
#                              runs each op (a silent fallback to the PyTorch reference would make
#                              every figure meaningless); which library emits the NVTX ranges
#   kernel_tests    40    70   the fused-kernel CUDA tests (~340; pytest -m cuda, all but the
#                              engine's; pytest-xdist -n 8 where installed)
#   engine_tests    25    50   the engine's CUDA tests (tests/test_engine.py -m cuda)
#   check           20    40   agreement on the bundled model for EVERY solver of
#                              genie_fast.solvers.SOLVERS (a solver the engine refuses is a recorded
#                              skip): graph vs eager fp32/fp16, fp16 and bf16 graphs vs fp32 eager
#   check_deep      15    30   the same on the deep U-Net, genie (own step: a failure of `check`
#                              never stops it)
#   bench           95  rest   bench/bench_sample.py with --budget-s = its limit - 15: NFE 10,
#                              genie, deep U-Net and bundled model at batch 1 and 64: eager fp32 (a),
#                              eager fp16 (b), engine (d), floor; torch.compile reduce-overhead at
#                              batch 64 (bundled model first: it compiles fastest); the engine for
#                              every other solver at batch 64; batch 256 if time is left; max-autotune
#                              last. Rows are written as measured; a timeout keeps them.
#   profile         10  rest   NVTX ranges seen by Nsight Compute (ncu --nvtx-include selects
#                              kernels; a made-up range none); a reported skip where ncu is missing
#                              or cannot read counters (gVisor); last, as the least valuable
#   total          300         (GPU_CHECK_TOTAL_S); the tool's timeout_s of 420 leaves room for the
#                              kill-after of a step (10 s) and the summary
#
# FILES under $OUT (at most 8 come back from the device tool, names of [A-Za-z0-9._-]):
#   summary.txt              what the end of the output shows: steps, versions, op backends, NVTX,
#                            tests, agreement, the latency table
#   status.tsv               step, status, seconds, limit, detail
#   versions.json            versions, each op's backend, NVTX emitter
#   checks.jsonl             one record per agreement check (and per skipped solver)
#   bench_sample.jsonl       the benchmark's rows, one JSON object per line, written as measured
#   gpu_check_logs.tar.gz    every step's full log, the pytest junit files, the ncu outputs;
#                            repacked after every step, so a kill keeps what had finished
# The state (logs, status, bench rows for a resumed bench, the build stamp) lives in
# out/gpu_check_state/ in the checkout (ignored by git; kept between calls on a warm machine).
#
# Environment: PYTHON (default python3, else .venv/bin/python), OUT (default out/gpu_check),
# GPU_CHECK_TOTAL_S (300), GPU_CHECK_SKIP_INSTALL=1 (never build), GPU_CHECK_BENCH_ARGS (extra
# arguments for bench_sample.py, e.g. "--extra-batch 256 --variants c_ma"), GPU_CHECK_XDIST (8).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT="${OUT:-$ROOT/out/gpu_check}"
STATE="${GPU_CHECK_STATE:-$ROOT/out/gpu_check_state}"
LOGS="$STATE/logs"
TOTAL_S="${GPU_CHECK_TOTAL_S:-300}"
export PYTHONUNBUFFERED=1
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif python3 -c "import torch" >/dev/null 2>&1; then PY=python3
elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
else PY=python3; fi
[[ $PY == */* ]] && PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # the import checks run from /tmp

ALL_STEPS=(install versions kernel_tests engine_tests check check_deep bench profile)
declare -A PLAN=([install]=90 [versions]=5 [kernel_tests]=40 [engine_tests]=25 [check]=20 [check_deep]=15
                 [bench]=95 [profile]=10)
declare -A CAP=([install]=150 [versions]=20 [kernel_tests]=70 [engine_tests]=50 [check]=40 [check_deep]=30
                [bench]=100000 [profile]=100000)
# the least a later step is left when an earlier one overruns (the bench keeps its 60 s)
declare -A MIN=([install]=0 [versions]=5 [kernel_tests]=20 [engine_tests]=15 [check]=10 [check_deep]=10
                [bench]=60 [profile]=0)

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }

# ------------------------------------------------------------------ arguments, selection
MODE=all; PLAN_ONLY=0; NAMED=()
for arg in "$@"; do
    case $arg in
        --rerun) MODE=rerun ;;
        --plan) PLAN_ONLY=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu_check: unknown option $arg" >&2; usage >&2; exit 2 ;;
        *) if [[ " ${ALL_STEPS[*]} " == *" $arg "* ]]; then NAMED+=("$arg"); MODE=named
           else echo "gpu_check: unknown step '$arg' (steps: ${ALL_STEPS[*]})" >&2; exit 2; fi ;;
    esac
done
if [ "$MODE" = named ] && [ ${#NAMED[@]} -eq 0 ]; then MODE=all; fi

declare -A PREV_STATUS=()
if [ -f "$STATE/status.tsv" ]; then
    while IFS=$'\t' read -r s st _rest; do [ -n "$s" ] && PREV_STATUS[$s]=$st; done < "$STATE/status.tsv"
fi

SELECTED=()
case $MODE in
    all) SELECTED=("${ALL_STEPS[@]}") ;;
    named) for s in "${ALL_STEPS[@]}"; do [[ " ${NAMED[*]} " == *" $s "* ]] && SELECTED+=("$s"); done ;;
    rerun)
        if [ ${#PREV_STATUS[@]} -eq 0 ]; then
            echo "gpu_check --rerun: no state of an earlier call ($STATE/status.tsv): every step"
            MODE=all; SELECTED=("${ALL_STEPS[@]}")
        else
            for s in "${ALL_STEPS[@]}"; do
                case ${PREV_STATUS[$s]:-notrun} in ok|skip) ;; *) SELECTED+=("$s") ;; esac
            done
        fi ;;
esac
# install is forced only when named (or failed before); otherwise it runs when the extension is not ready
FORCE_INSTALL=0
[[ " ${SELECTED[*]} " == *" install "* ]] && [ "$MODE" != all ] && FORCE_INSTALL=1

selected() { [[ " ${SELECTED[*]} " == *" $1 "* ]]; }

if [ "$PLAN_ONLY" = 1 ]; then
    echo "gpu_check plan ($MODE; total ${TOTAL_S}s; python: $PY):"
    for s in "${ALL_STEPS[@]}"; do
        if selected "$s" || [ "$s" = install ]; then
            note=""
            [ "$s" = install ] && { [ "$FORCE_INSTALL" = 1 ] && note="(forced)" || note="(when the extension is not ready)"; }
            selected "$s" || note="(only when the extension is not ready)"
            cap=${CAP[$s]}; [ "$cap" -ge 100000 ] && cap=rest
            printf '  run   %-13s plan %3ss  cap %4s  %s\n' "$s" "${PLAN[$s]}" "$cap" "$note"
        else
            printf '  skip  %-13s (%s)\n' "$s" "${PREV_STATUS[$s]:+last call: }${PREV_STATUS[$s]:-not named}"
        fi
    done
    exit 0
fi

# ------------------------------------------------------------------ state, output, helpers
mkdir -p "$OUT" "$LOGS"
for f in summary.txt status.tsv versions.json checks.jsonl bench_sample.jsonl gpu_check_logs.tar.gz; do
    rm -f "$OUT/$f"
done
START=$SECONDS
declare -A STATUS=() SECS=() LIMITS=() DETAIL=()
for s in "${ALL_STEPS[@]}"; do STATUS[$s]=${PREV_STATUS[$s]:-notrun}; done
for s in "${SELECTED[@]}"; do STATUS[$s]="pending"; done

left() { echo $(( TOTAL_S - (SECONDS - START) )); }
SIGINT_DEFAULT='import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])'

write_status() {
    : > "$STATE/status.tsv"
    for s in "${ALL_STEPS[@]}"; do
        printf '%s\t%s\t%s\t%s\t%s\n' "$s" "${STATUS[$s]}" "${SECS[$s]:--}" "${LIMITS[$s]:--}" "${DETAIL[$s]:-}" \
            >> "$STATE/status.tsv"
    done
    cp "$STATE/status.tsv" "$OUT/status.tsv"
}

pack() {  # every log into one archive under $OUT (repacked after each step: a kill keeps the rest)
    write_status
    tar -czf "$OUT/gpu_check_logs.tar.gz.part" -C "$STATE" logs status.tsv 2>/dev/null &&
        mv -f "$OUT/gpu_check_logs.tar.gz.part" "$OUT/gpu_check_logs.tar.gz"
    rm -f "$OUT/gpu_check_logs.tar.gz.part"
}

reserve_after() {  # seconds the selected steps after $1 keep at least
    local r=0 after=0 s
    for s in "${ALL_STEPS[@]}"; do
        [ "$after" = 1 ] && selected "$s" && r=$(( r + ${MIN[$s]} ))
        [ "$s" = "$1" ] && after=1
    done
    echo $r
}

step_limit() {  # the limit of step $1: its cap, within what the total leaves it
    local cap=${CAP[$1]} avail
    avail=$(( $(left) - $(reserve_after "$1") ))
    [ "$avail" -lt "$cap" ] && cap=$avail
    echo $cap
}

# run_step NAME LIMIT CMD...: run with a time limit (SIGINT, KILL 10 s later), log to $LOGS/NAME.log
run_step() {
    local name=$1 limit=$2; shift 2
    LIMITS[$name]=$limit
    if [ "$limit" -lt 10 ]; then
        STATUS[$name]="notrun"; DETAIL[$name]="no time left (${limit}s)"; echo "=== $name: no time left ==="
        pack; return 0
    fi
    echo "=== $name (limit ${limit}s; $(left)s of ${TOTAL_S}s left) ==="
    local t0=$SECONDS
    # SIGINT at the limit (pytest and the bench then print what they have), KILL 10 s later. The
    # child gets SIGINT back to its default first: a background shell hands it down ignored.
    timeout --signal=INT --kill-after=10 "$limit" "$PY" -c "$SIGINT_DEFAULT" "$@" 2>&1 | tee "$LOGS/$name.log"
    local rc=${PIPESTATUS[0]}
    SECS[$name]=$(( SECONDS - t0 ))
    case $rc in
        0) STATUS[$name]=ok ;;
        124|137) STATUS[$name]=timeout; DETAIL[$name]="stopped at its ${limit}s limit"
                 echo "[$name] stopped at its ${limit}s limit" ;;
        *) STATUS[$name]="fail:$rc" ;;
    esac
    pack
    return 0
}

skip_step() { STATUS[$1]=skip; DETAIL[$1]=$2; echo "=== $1: skipped ($2) ==="; pack; }

echo "gpu_check: $MODE, steps: ${SELECTED[*]:-none}; python: $PY; out: $OUT"

# ------------------------------------------------------------------ 1. install
src_stamp() {
    { find csrc -type f | LC_ALL=C sort | xargs cat; cat CMakeLists.txt setup.py
      $PY -c "import sys, torch; print(sys.version, torch.__version__)"; } 2>/dev/null | sha256sum | cut -d' ' -f1
}
# 0: genie_fast._C imports with every fused op's kernel for each device torch sees (CUDA included
# where a GPU is present) and, where this script built it, from the current sources
ext_ready() {
    if [ -f "$STATE/build.stamp" ] && [ "$(cat "$STATE/build.stamp")" != "$(src_stamp)" ]; then
        echo "gpu_check: the C++/CUDA sources changed since the last build"; return 1
    fi
    (cd /tmp && $PY - <<'EOF'
import sys
import torch
try:
    from genie_fast import _ext
    from genie_fast import ops  # noqa: F401
except Exception as e:
    print(f"gpu_check: genie_fast does not import: {type(e).__name__}: {e}"); sys.exit(1)
devs = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
fused = sorted({n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("genie_fast::")})
missing = [f"{op}/{d}" for op in fused for d in devs if not _ext.has_op(op, d)] if fused else ["every op"]
if missing:
    print(f"gpu_check: genie_fast._C is {'missing' if _ext._C is None else 'without kernels for ' + ', '.join(missing)}")
    sys.exit(1)
print(f"gpu_check: genie_fast._C imports with every op's kernels for {devs}")
EOF
    )
}
if [ "${GPU_CHECK_SKIP_INSTALL:-0}" = 1 ]; then
    skip_step install "GPU_CHECK_SKIP_INSTALL=1"
elif [ "$FORCE_INSTALL" = 0 ] && ext_ready; then
    if selected install; then skip_step install "extension ready"; else echo "=== install: extension ready ==="; fi
else
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
    export GENIE_FAST_BUILD_DIR="${GENIE_FAST_BUILD_DIR:-$ROOT/build/gpu_check}"  # incremental on a warm machine
    run_step install "$(step_limit install)" $PY -m pip install --no-build-isolation --no-deps -e .
    if [ "${STATUS[install]}" != ok ]; then
        echo "install with CUDA failed (log in the archive, logs/install.log): again with GENIE_FAST_CUDA=OFF"
        cp "$LOGS/install.log" "$LOGS/install_cuda.log"
        GENIE_FAST_CUDA=OFF GENIE_FAST_BUILD_DIR="$GENIE_FAST_BUILD_DIR-nocuda" \
            timeout 120 $PY -m pip install --no-build-isolation --no-deps -e . > "$LOGS/install_nocuda.log" 2>&1 &&
            DETAIL[install]="CUDA build failed; built with GENIE_FAST_CUDA=OFF (CUDA steps run on Triton)" ||
            DETAIL[install]="CUDA build and GENIE_FAST_CUDA=OFF build failed"
        echo "${DETAIL[install]}"
    else
        src_stamp > "$STATE/build.stamp"
    fi
    pack
fi
read -r HAS_CUDA GF_IMPORTS < <(cd /tmp && $PY -c "
import torch
try:
    import genie_fast  # noqa: F401
    ok = 1
except Exception:
    ok = 0
print(int(torch.cuda.is_available()), ok)" 2>/dev/null || echo "0 0")
echo "gpu_check: CUDA available: $HAS_CUDA"
# last resort: no install at all; a tree whose genie_fast.kernels resolves (as the install maps it)
if [ "$GF_IMPORTS" != 1 ]; then
    SHIM="$STATE/pyshim"; rm -rf "$SHIM"; mkdir -p "$SHIM/genie_fast"
    for f in "$ROOT"/genie_fast/*; do ln -s "$f" "$SHIM/genie_fast/"; done
    ln -s "$ROOT/kernels" "$SHIM/genie_fast/kernels"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_check: genie_fast is not installed: importing it from the tree (no compiled ops; see versions)"
fi

# ------------------------------------------------------------------ 2. versions
if selected versions; then
    run_step versions "$(step_limit versions)" bash -c "
      (nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 || echo 'nvidia-smi: none')
      for tool in nvcc ncu nsys; do
        if command -v \$tool >/dev/null; then echo \"\$tool: \$(\$tool --version 2>&1 | tail -n 1)\"; else echo \"\$tool: none on PATH\"; fi
      done
      $PY -c 'import xdist' 2>/dev/null && echo 'pytest-xdist: present' || echo 'pytest-xdist: none'
      $PY bench/bench_sample.py --versions > '$OUT/versions.json' && cat '$OUT/versions.json'"
fi

# ------------------------------------------------------------------ 3.-4. CUDA tests
XDIST=()
if [ "$HAS_CUDA" = 1 ] && $PY -c "import xdist" >/dev/null 2>&1; then XDIST=(-n "${GPU_CHECK_XDIST:-8}"); fi
if selected kernel_tests; then
    run_step kernel_tests "$(step_limit kernel_tests)" $PY -m pytest -m cuda -q -rs -p no:cacheprovider \
        "${XDIST[@]}" tests --ignore=tests/test_engine.py --junitxml="$LOGS/kernel_tests_junit.xml"
fi
if selected engine_tests; then
    run_step engine_tests "$(step_limit engine_tests)" $PY -m pytest -m cuda -q -rs -p no:cacheprovider \
        tests/test_engine.py --junitxml="$LOGS/engine_tests_junit.xml"
fi

# ------------------------------------------------------------------ 5. agreement checks (separate steps)
if selected check; then
    CHECK_ARGS=(--model default --batch 8 --nfe 10)
    [ "$HAS_CUDA" = 1 ] || CHECK_ARGS=(--model tiny --batch 2 --nfe 10)  # CPU: the code path, in seconds
    run_step check "$(step_limit check)" $PY bench/profile_sample.py --check --solver all "${CHECK_ARGS[@]}" \
        --json "$OUT/checks.jsonl"
fi
if selected check_deep; then
    if [ "$HAS_CUDA" = 1 ]; then
        run_step check_deep "$(step_limit check_deep)" $PY bench/profile_sample.py --check --model deep \
            --solver genie --batch 4 --nfe 10 --json "$OUT/checks.jsonl"
    else
        skip_step check_deep "no GPU (the deep U-Net is GPU-sized)"
    fi
fi

# ------------------------------------------------------------------ 6. benchmark
if selected bench; then
    RESUME=()
    if [ "$MODE" != all ] && [ -f "$STATE/bench_sample.jsonl" ]; then  # a rerun continues the last rows
        cp "$STATE/bench_sample.jsonl" "$OUT/bench_sample.jsonl"; RESUME=(--resume)
    fi
    profile_reserve=0; selected profile && profile_reserve=${PLAN[profile]}
    LIM=$(( $(left) - profile_reserve ))
    if [ "$HAS_CUDA" = 1 ]; then
        run_step bench "$LIM" $PY bench/bench_sample.py --budget-s $(( LIM - 15 )) \
            --json "$OUT/bench_sample.jsonl" "${RESUME[@]}" ${GPU_CHECK_BENCH_ARGS:-}
    else
        run_step bench "$LIM" $PY bench/bench_sample.py --smoke --budget-s $(( LIM - 15 )) \
            --json "$OUT/bench_sample.jsonl" "${RESUME[@]}" ${GPU_CHECK_BENCH_ARGS:-}
    fi
    [ -f "$OUT/bench_sample.jsonl" ] && cp "$OUT/bench_sample.jsonl" "$STATE/bench_sample.jsonl"
fi

# ------------------------------------------------------------------ 7. profiler (last)
nvtx_ncu() {  # an NVTX filter of the genie_fast ranges must select kernels, a made-up one none
    local run="$PY bench/profile_sample.py --model default --batch 2 --nfe 3 --iters 1 --mode both"
    local filt base hit miss
    filt=$($PY -c "from genie_fast import profiling as p; print(p.ncu_nvtx_filter('sample'))")
    echo "NVTX emitter: $($PY -c "from genie_fast import profiling as p; print(p.emitter())"); ncu filter: $filt"
    base="ncu --nvtx --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --launch-count 5"
    $base --nvtx-include "$filt" $run > "$LOGS/ncu_sample.txt" 2>&1
    hit=$(grep -c "gpu__time_duration.sum" "$LOGS/ncu_sample.txt")
    if [ "$hit" = 0 ] && grep -q "LibraryNotLoaded\|ERR_NVGPUCTRPERM\|not supported\|Failed to initialize" "$LOGS/ncu_sample.txt"; then
        grep -m2 "==ERROR==\|==WARNING==" "$LOGS/ncu_sample.txt"
        echo "NVTX: skip (ncu cannot profile on this machine)"; return 3
    fi
    $base --nvtx-include "no_such_range/" $run > "$LOGS/ncu_control.txt" 2>&1
    miss=$(grep -c "gpu__time_duration.sum" "$LOGS/ncu_control.txt")
    echo "NVTX via ncu: kernels selected by $filt: $hit; by a made-up range: $miss"
    if [ "$hit" -gt 0 ] && [ "$miss" = 0 ]; then echo "NVTX: ok"; return 0; fi
    echo "NVTX: not shown (see logs/ncu_*.txt)"; return 1
}
if selected profile; then
    if [ "$HAS_CUDA" != 1 ]; then skip_step profile "no GPU"
    elif ! command -v ncu >/dev/null; then skip_step profile "ncu not on PATH (nsys: $(command -v nsys || echo none))"
    else
        run_step profile "$(left)" bash -c "$(declare -f nvtx_ncu); PY='$PY' LOGS='$LOGS' nvtx_ncu"
        [ "${STATUS[profile]}" = "fail:3" ] && { STATUS[profile]=skip; DETAIL[profile]="ncu cannot profile here"; pack; }
    fi
fi

# ------------------------------------------------------------------ summary (last in the output)
summary() {
    echo "=== gpu_check summary: $(date -u +%Y-%m-%dT%H:%MZ), $MODE, $(( SECONDS - START ))s of ${TOTAL_S}s ==="
    if [ -f "$OUT/versions.json" ]; then
        $PY - "$OUT/versions.json" <<'EOF'
import json, sys
try:
    v = json.load(open(sys.argv[1]))
except Exception as e:  # the versions step failed: its log is in the archive
    sys.exit(print(f"versions.json unreadable ({type(e).__name__}); see logs/versions.log"))
print(f"{v['gpu']} | torch {v['torch']} | CUDA {v['cuda']} | triton {v['triton']} | python {v['python']} "
      f"| _C loaded: {v['ext_loaded']} | NVTX: {v['nvtx']['emitter']}")
print(f"op backends ({v['device']}, auto): {v['op_backends_auto']}"
      + ("" if v['fused'] or v['device'] == 'cpu' else "   <-- UNFUSED: some ops run the PyTorch reference"))
EOF
    fi
    printf '%-13s %-9s %5s %5s  %s\n' step status secs limit detail
    for s in "${ALL_STEPS[@]}"; do
        printf '%-13s %-9s %5s %5s  %s\n' "$s" "${STATUS[$s]}" "${SECS[$s]:--}" "${LIMITS[$s]:--}" "${DETAIL[$s]:-}"
    done
    for t in kernel_tests engine_tests; do
        [ -f "$LOGS/$t.log" ] && echo "$t: $(grep -E '(passed|failed|skipped|error)' "$LOGS/$t.log" | tail -n 1)"
    done
    if [ -f "$OUT/checks.jsonl" ]; then
        $PY - "$OUT/checks.jsonl" <<'EOF'
import json, sys
others = {}
for line in open(sys.argv[1]):
    try:
        d = json.loads(line)
    except json.JSONDecodeError:
        continue
    c = d.get("check")
    if "rel_l2" in d:
        print(f"  {c:<25} {d['model']:>8} {d['solver']:>12} B={d['batch']:<3} rel L2 {d['rel_l2']:.2e} "
              f"(bound {d['bound']:.0e}) {'ok' if d['ok'] else 'FAIL'}")
    elif c in ("skip", "error"):  # one line per reason, naming the solvers
        others.setdefault((c, d["model"], d.get("reason") or d.get("error")), []).append(d["solver"])
for (c, model, why), solvers in others.items():
    print(f"  {c} {model} {', '.join(solvers)}: {why}"[:300])
EOF
    fi
    grep -h "^NVTX" "$LOGS/profile.log" 2>/dev/null
    if [ -f "$OUT/bench_sample.jsonl" ]; then
        $PY bench/bench_sample.py --table "$OUT/bench_sample.jsonl" 2>&1 | tail -n 60
    fi
    echo "files under \$OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
    local again=()
    for s in "${ALL_STEPS[@]}"; do
        case ${STATUS[$s]} in ok|skip) ;; *) again+=("$s") ;; esac
    done
    if [ ${#again[@]} -gt 0 ]; then echo "rerun: bash bench/gpu_check.sh --rerun   (repeats: ${again[*]})"
    else echo "every step ok or skipped"; fi
}
pack
summary > "$OUT/summary.txt" 2>&1
echo
cat "$OUT/summary.txt"
pack
exit 0
