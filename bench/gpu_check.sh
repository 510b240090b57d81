#!/usr/bin/env bash
# The one prepared GPU check of genie_fast: the headline GPU figures first, within about 360 s of
# one call on a bare H100/H200 (16 CPU cores, Python 3.12, torch 2.11.0+cu130, triton 3.6.0,
# nvcc 13.0; no nvtx Python package, no Nsight Systems, ncu reads counters on some machines only;
# no network); the rest in that call while time is left, else in one rerun of about 180 s.
# Everything also runs here on a CPU, with the GPU parts skipped.
#
#   bash bench/gpu_check.sh                  # first call: every step, in the order below (total 420 s)
#   bash bench/gpu_check.sh --rerun          # only the steps that failed, timed out or did not run
#                                            # in the last call (state in out/gpu_check_state/,
#                                            # kept on a warm machine; without it: every step);
#                                            # total 160 s
#   bash bench/gpu_check.sh bench profile    # only the named steps (total 420 s)
#   bash bench/gpu_check.sh --plan [...]     # print what would run, with its limits, and exit
#
# Device tool: run(command="bash bench/gpu_check.sh", timeout_s=480) for the first call, then
# run(command="bash bench/gpu_check.sh --rerun", timeout_s=180) for what it left (on the still-warm
# machine: 30 s; on a fresh one name the steps instead). The build is skipped whenever
# genie_fast._C already imports with every op's kernels for this machine's devices (a warm
# machine), unless its sources changed since the build this script made (a stamp in the state
# folder) or `install` is named.
#
# TIME PLAN on a bare H100/H200 (seconds: plan = expected, cap = most, need = the least a step is
# started with; a step never runs past its cap nor past what the total leaves, and one that would
# start with less than its need is left for the rerun, never started to be killed). The headline
# steps (call 1) end within 360 s (GPU_CHECK_HEADLINE_S; their caps sum to it) and reserve their
# needs against an overrun of the build; the other steps follow in order of value while the total
# (420) leaves them their need, and the rerun (total 160) takes the rest.
#   step         plan   cap  need  call  what
#   install       100   150    20  1     offline editable install (pip --no-index): CMake builds
#                                        genie_fast._C with its CUDA kernels (sm_90, 16 jobs, kept
#                                        in build/gpu_check). A build stopped at its cap is a
#                                        timeout, continued by the rerun; only a failed build is
#                                        redone with GENIE_FAST_CUDA=OFF, in what is left of the cap
#                                        (Triton then runs the steps). Skipped when the extension
#                                        is ready
#   versions        8    25     6  1     card, driver, torch, triton, CUDA, cuDNN, nvcc, ncu; the
#                                        backend that runs each op (a silent fallback to the
#                                        PyTorch reference would make every figure meaningless)
#   smoke          25    45    15  1     one fused-kernel CUDA test (genie_step) and one engine
#                                        test (CUDA graph vs eager, genie)
#   bench         110   140    45  1     bench_sample.py --rows headline: deep U-Net and bundled
#                                        model, batch 1 and 64, NFE 10, the default solver: eager fp32 (a),
#                                        eager fp16 (b), the engine (d), the NFE x forward floor.
#                                        Rows are written as measured; a timeout keeps them
#   kernel_tests   45    70    30  1|2   the fused-kernel CUDA tests (~360; pytest -m cuda, all but
#                                        the engine's; pytest-xdist -n 8 where installed)
#   engine_tests   35    60    25  1|2   the engine's CUDA tests (tests/test_engine.py -m cuda,
#                                        ~56 graph captures; pytest-xdist -n 4 where installed)
#   check          30    50    20  1|2   agreement on the bundled model for EVERY solver (a solver
#                                        the engine refuses is a recorded skip): graph vs eager
#                                        fp32/fp16, fp16 and bf16 graphs vs fp32 eager
#   check_deep     18    30    15  1|2   the same on the deep U-Net, genie
#   bench_rest     60    90    30  1|2   bench_sample.py --rows rest --resume (same file):
#                                        torch.compile, the other solvers, the step-op bandwidth
#                                        row, extra batches
#   profile        30   100    25  1|2   Nsight Compute: a one-kernel probe (20 s) first; where ncu
#                                        reads counters, NVTX ranges must select kernels (a made-up
#                                        range none); a permission error or no counters is a skip
#                                        with its reason
#   total         461                    call 1: GPU_CHECK_TOTAL_S=420 in a tool call of 480 s
#                                        (room for a step's 10 s kill-after and the summary);
#                                        --rerun: 160 in a tool call of 180 s
#
# FILES under $OUT (at most 8 come back from the device tool, names of [A-Za-z0-9._-]):
#   summary.txt              what the end of the output shows: steps, versions, op backends, NVTX,
#                            tests, agreement, the latency table
#   status.tsv               step, status, seconds, limit, detail
#   versions.json            versions, each op's backend, NVTX emitter
#   checks.jsonl             one record per agreement check (and per skipped solver)
#   bench_sample.jsonl       the benchmark's rows (headline, then the rest), one JSON object per
#                            line, written as measured
#   gpu_check_logs.tar.gz    every step's full log, the pytest junit files, the ncu outputs;
#                            repacked after every step, so a kill keeps what had finished
# The state (logs, status, bench rows for a resumed bench, the build stamps) lives in
# out/gpu_check_state/ in the checkout (ignored by git; kept between calls on a warm machine).
#
# Environment: PYTHON (default python3, else .venv/bin/python), OUT (default out/gpu_check),
# GPU_CHECK_TOTAL_S (420; 160 with --rerun), GPU_CHECK_HEADLINE_S (360), GPU_CHECK_CAP_<step>
# (override a cap), GPU_CHECK_SKIP_INSTALL=1 (never build), GPU_CHECK_BENCH_ARGS (extra arguments
# for both bench steps), GPU_CHECK_XDIST (8), GPU_CHECK_XDIST_ENGINE (4), GPU_CHECK_NCU_PROBE_S
# (20), GPU_CHECK_HAS_CUDA (0/1: override the GPU detection; for the CPU tests).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT="${OUT:-$ROOT/out/gpu_check}"
STATE="${GPU_CHECK_STATE:-$ROOT/out/gpu_check_state}"
LOGS="$STATE/logs"
export PYTHONUNBUFFERED=1
# pip never asks, never looks for a newer pip and never reaches an index (the machine has no network)
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1 PIP_ROOT_USER_ACTION=ignore
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif python3 -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)" >/dev/null 2>&1; then
    PY=python3  # (found without importing it: a cold torch import on a fresh machine takes seconds)
elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
else PY=python3; fi
[[ $PY == */* ]] && PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # the import checks run from /tmp

ALL_STEPS=(install versions smoke bench kernel_tests engine_tests check check_deep bench_rest profile)
HEADLINE_STEPS=(install versions smoke bench)
declare -A PLAN=([install]=100 [versions]=8 [smoke]=25 [bench]=110 [kernel_tests]=45 [engine_tests]=35
                 [check]=30 [check_deep]=18 [bench_rest]=60 [profile]=30)
declare -A CAP=([install]=150 [versions]=25 [smoke]=45 [bench]=140 [kernel_tests]=70 [engine_tests]=60
                [check]=50 [check_deep]=30 [bench_rest]=90 [profile]=100)
declare -A NEED=([install]=20 [versions]=6 [smoke]=15 [bench]=45 [kernel_tests]=30 [engine_tests]=25
                 [check]=20 [check_deep]=15 [bench_rest]=30 [profile]=25)
for s in "${ALL_STEPS[@]}"; do  # GPU_CHECK_CAP_<step>=N overrides a cap (its need stays within it)
    v=GPU_CHECK_CAP_$s
    if [ -n "${!v:-}" ]; then CAP[$s]=${!v}; fi
    if [ "${NEED[$s]}" -gt "${CAP[$s]}" ]; then NEED[$s]=${CAP[$s]}; fi
done
# the one pip command (offline: --no-index; no version check, no prompt)
PIP_INSTALL=("$PY" -m pip install --no-index --disable-pip-version-check --no-input --no-build-isolation
             --no-deps -v -e .)
# the smoke step's tests: one fused-kernel CUDA test, one engine agreement test
SMOKE_TESTS=("tests/test_genie_step.py::TestGenieStep::test_cuda_misc[cuda]"
             "tests/test_engine.py::test_cuda_graph_replay_equals_eager[genie]")
NCU_PROBE_S="${GPU_CHECK_NCU_PROBE_S:-20}"

usage() { sed -n '2,/^# TIME PLAN/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

# ------------------------------------------------------------------ arguments, selection
MODE=all; PLAN_ONLY=0; NAMED=(); RERUN_FLAG=0
for arg in "$@"; do
    case $arg in
        --rerun) MODE=rerun; RERUN_FLAG=1 ;;
        --plan) PLAN_ONLY=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu_check: unknown option $arg" >&2; usage >&2; exit 2 ;;
        *) if [[ " ${ALL_STEPS[*]} " == *" $arg "* ]]; then NAMED+=("$arg"); MODE=named
           else echo "gpu_check: unknown step '$arg' (steps: ${ALL_STEPS[*]})" >&2; exit 2; fi ;;
    esac
done
if [ "$RERUN_FLAG" = 1 ] && [ ${#NAMED[@]} -gt 0 ]; then
    echo "gpu_check: --rerun takes no step names" >&2; exit 2
fi
# the total: a first call gets 420 s of a 480 s tool call, a rerun 160 s of a 180 s one
FIRST_TOTAL_S=420; RERUN_TOTAL_S=160
if [ "$RERUN_FLAG" = 1 ]; then TOTAL_S="${GPU_CHECK_TOTAL_S:-$RERUN_TOTAL_S}"; else TOTAL_S="${GPU_CHECK_TOTAL_S:-$FIRST_TOTAL_S}"; fi
HEADLINE_S="${GPU_CHECK_HEADLINE_S:-360}"
[ "$HEADLINE_S" -gt "$TOTAL_S" ] && HEADLINE_S=$TOTAL_S

declare -A PREV_STATUS=() PREV_DETAIL=()
if [ -f "$STATE/status.tsv" ]; then
    while IFS=$'\t' read -r s st _secs _lim det; do
        [ -n "$s" ] && { PREV_STATUS[$s]=$st; PREV_DETAIL[$s]=$det; }
    done < "$STATE/status.tsv"
fi

SELECTED=()
case $MODE in
    all) SELECTED=("${ALL_STEPS[@]}") ;;
    named) for s in "${ALL_STEPS[@]}"; do [[ " ${NAMED[*]} " == *" $s "* ]] && SELECTED+=("$s"); done ;;
    rerun)
        if [ ${#PREV_STATUS[@]} -eq 0 ]; then
            echo "gpu_check --rerun: no state of an earlier call ($STATE/status.tsv): every step"
            SELECTED=("${ALL_STEPS[@]}")
        else
            for s in "${ALL_STEPS[@]}"; do
                case ${PREV_STATUS[$s]:-notrun} in ok|skip) ;; *) SELECTED+=("$s") ;; esac
            done
        fi ;;
esac
# install is forced only when named; otherwise it runs when the extension is not ready (a build
# that timed out or failed leaves it not ready: the rerun continues it)
FORCE_INSTALL=0
[[ " ${SELECTED[*]} " == *" install "* ]] && [ "$MODE" = named ] && FORCE_INSTALL=1

selected() { [[ " ${SELECTED[*]} " == *" $1 "* ]]; }
is_headline() { [[ " ${HEADLINE_STEPS[*]} " == *" $1 "* ]]; }

if [ "$PLAN_ONLY" = 1 ]; then
    echo "gpu_check plan ($MODE; total ${TOTAL_S}s, headline by ${HEADLINE_S}s; python: $PY):"
    by=0; plan_sum=0
    for s in "${ALL_STEPS[@]}"; do
        if selected "$s" || [ "$s" = install ]; then
            note=""
            if [ "$s" = install ]; then
                if [ "$FORCE_INSTALL" = 1 ]; then note="(forced)"; else note="(when the extension is not ready)"; fi
                selected "$s" || note="(only when the extension is not ready)"
            elif ! is_headline "$s"; then note="(while the total leaves its need; else the rerun)"
            fi
            by=$(( by + CAP[$s] ))
            selected "$s" && plan_sum=$(( plan_sum + PLAN[$s] ))  # (an install only if not ready: not counted)
            end=$by
            if is_headline "$s"; then [ "$end" -gt "$HEADLINE_S" ] && end=$HEADLINE_S
            else [ "$end" -gt "$TOTAL_S" ] && end=$TOTAL_S; fi
            printf '  run   %-13s plan %3ss  cap %4ss  need %3ss  by %4ss  %s\n' "$s" "${PLAN[$s]}" "${CAP[$s]}" \
                "${NEED[$s]}" "$end" "$note"
        else
            printf '  skip  %-13s (%s)\n' "$s" "${PREV_STATUS[$s]:+last call: }${PREV_STATUS[$s]:-not named}"
        fi
    done
    echo "plan of the steps that run: ${plan_sum}s in a total of ${TOTAL_S}s ('by': where their caps end at the"
    echo "latest); a step the total no longer leaves its need is left for: bash bench/gpu_check.sh --rerun"
    echo "(total ${RERUN_TOTAL_S}s, in a tool call of timeout_s 180)"
    echo "install command: ${PIP_INSTALL[*]}"
    echo "smoke tests: ${SMOKE_TESTS[*]}"
    echo "ncu probe: ncu --metrics gpu__time_duration.sum (one kernel, ${NCU_PROBE_S}s) before the NVTX check"
    exit 0
fi

# ------------------------------------------------------------------ state, output, helpers
mkdir -p "$OUT" "$LOGS"
for f in summary.txt status.tsv versions.json checks.jsonl bench_sample.jsonl gpu_check_logs.tar.gz; do
    rm -f "$OUT/$f"
done
[ "$MODE" = all ] && rm -f "$STATE/bench_sample.jsonl"  # a first call measures afresh
START=$SECONDS
HEADLINE_DONE=""
declare -A STATUS=() SECS=() LIMITS=() DETAIL=()
for s in "${ALL_STEPS[@]}"; do STATUS[$s]=${PREV_STATUS[$s]:-notrun}; DETAIL[$s]=${PREV_DETAIL[$s]:-}; done
for s in "${SELECTED[@]}"; do STATUS[$s]="pending"; DETAIL[$s]=""; done

elapsed() { echo $(( SECONDS - START )); }
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

reserve_after() {  # seconds a headline step leaves the selected headline steps after it (their needs)
    local r=0 after=0 s
    is_headline "$1" || { echo 0; return; }  # the other steps go in order of value, greedily
    for s in "${HEADLINE_STEPS[@]}"; do
        [ "$after" = 1 ] && selected "$s" && r=$(( r + NEED[$s] ))
        [ "$s" = "$1" ] && after=1
    done
    echo $r
}

step_limit() {  # the limit of step $1: its cap, within what the total (and the headline's end) leaves it
    local cap=${CAP[$1]} avail hl
    avail=$(( $(left) - $(reserve_after "$1") ))
    if is_headline "$1"; then
        hl=$(( HEADLINE_S - $(elapsed) - $(reserve_after "$1") ))
        [ "$hl" -lt "$avail" ] && avail=$hl
    fi
    [ "$avail" -lt "$cap" ] && cap=$avail
    [ "$cap" -lt 0 ] && cap=0
    echo $cap
}

# timed_run LIMIT LOG CMD...: run with a time limit (SIGINT, KILL 10 s later), output to LOG and
# stdout; returns the command's status (124 or 137: stopped at the limit)
timed_run() {
    local limit=$1 log=$2; shift 2
    # SIGINT at the limit (pytest and the bench then print what they have), KILL 10 s later. The
    # child gets SIGINT back to its default first: a background shell hands it down ignored.
    timeout --signal=INT --kill-after=10 "$limit" "$PY" -c "$SIGINT_DEFAULT" "$@" 2>&1 | tee "$log"
    return "${PIPESTATUS[0]}"
}

# starts NAME LIMIT: 0 when step NAME may start with LIMIT seconds (its need); else it is left
# for the rerun (notrun) and said so
starts() {
    local name=$1 limit=$2
    LIMITS[$name]=$limit
    if [ "$limit" -lt "${NEED[$name]}" ] || [ "$limit" -lt 1 ]; then
        STATUS[$name]="notrun"; DETAIL[$name]="no time left (${limit}s, needs ${NEED[$name]}s): the rerun runs it"
        echo "=== $name: not started (${limit}s left of its need of ${NEED[$name]}s; the rerun runs it) ==="
        pack; return 1
    fi
    return 0
}

# run_step NAME LIMIT CMD...: a step, logged to $LOGS/NAME.log
run_step() {
    local name=$1 limit=$2; shift 2
    starts "$name" "$limit" || return 0
    echo "=== $name (limit ${limit}s; $(left)s of ${TOTAL_S}s left) ==="
    local t0=$SECONDS rc
    timed_run "$limit" "$LOGS/$name.log" "$@"; rc=$?
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

echo "gpu_check: $MODE, steps: ${SELECTED[*]:-none}; total ${TOTAL_S}s (headline by ${HEADLINE_S}s);" \
     "python: $PY; out: $OUT"

# ------------------------------------------------------------------ 1. install
src_stamp() {  # the C++/CUDA sources and the Python/torch they are built for (no torch import)
    { find csrc -type f | LC_ALL=C sort | xargs cat; cat CMakeLists.txt setup.py
      $PY -c "import sys, importlib.metadata as m; print(sys.version, m.version('torch'))"; } 2>/dev/null |
        sha256sum | cut -d' ' -f1
}
# the CUDA build failed (not: timed out) on these very sources in an earlier call: not retried
# unless `install` is named
cuda_known_bad() {
    [ -f "$STATE/cuda_build.failed" ] && [ "$(cut -d' ' -f1 "$STATE/cuda_build.failed")" = "$(src_stamp)" ]
}
# 0: genie_fast._C imports with every fused op's kernel for each device torch sees (CUDA included
# where a GPU is present, unless the CUDA build is known to fail) and, where this script built it,
# from the current sources
ext_ready() {
    if ! (cd /tmp && $PY -c "import importlib.util as u, sys; sys.exit(u.find_spec('genie_fast') is None)" \
          2>/dev/null); then
        echo "gpu_check: genie_fast is not installed"; return 1  # (a bare machine: no torch import)
    fi
    if [ -f "$STATE/build.stamp" ] && [ "$(cat "$STATE/build.stamp")" != "$(src_stamp)" ]; then
        echo "gpu_check: the C++/CUDA sources changed since the last build"; return 1
    fi
    local cuda_optional=0
    cuda_known_bad && cuda_optional=1
    (cd /tmp && GF_CUDA_OPTIONAL=$cuda_optional $PY - <<'EOF'
import os, sys
import torch
try:
    from genie_fast import _ext
    from genie_fast import ops  # noqa: F401
except Exception as e:
    print(f"gpu_check: genie_fast does not import: {type(e).__name__}: {e}"); sys.exit(1)
devs = ["cpu"] + (["cuda"] if torch.cuda.is_available() and os.environ["GF_CUDA_OPTIONAL"] != "1" else [])
fused = sorted({n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("genie_fast::")})
missing = [f"{op}/{d}" for op in fused for d in devs if not _ext.has_op(op, d)] if fused else ["every op"]
if missing:
    print(f"gpu_check: genie_fast._C is {'missing' if _ext._C is None else 'without kernels for ' + ', '.join(missing)}")
    sys.exit(1)
print(f"gpu_check: genie_fast._C imports with every op's kernels for {devs}")
EOF
    )
}

# The install step: the CUDA build. Stopped at its limit, it is a timeout (the rerun continues the
# incremental build in the same GENIE_FAST_BUILD_DIR); only a real failure is redone with
# GENIE_FAST_CUDA=OFF, within what is left of the same limit.
install_step() {
    local lim t0=$SECONDS rc cuda_rc rest
    lim=$(step_limit install)
    starts install "$lim" || return 0
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
    export GENIE_FAST_BUILD_DIR="${GENIE_FAST_BUILD_DIR:-$ROOT/build/gpu_check}"  # incremental on a warm machine
    if [ "$MODE" = named ]; then rm -f "$STATE/cuda_build.failed"; fi  # named: the CUDA build is retried
    if cuda_known_bad; then
        cuda_rc=$(cut -d' ' -f2 "$STATE/cuda_build.failed")
        echo "=== install: the CUDA build failed on these sources in an earlier call (exit $cuda_rc; name" \
             "install to retry it): GENIE_FAST_CUDA=OFF (limit ${lim}s) ==="
    else
        echo "=== install: CUDA build (limit ${lim}s; $(left)s of ${TOTAL_S}s left) ==="
        timed_run "$lim" "$LOGS/install.log" "${PIP_INSTALL[@]}"; rc=$?
        SECS[install]=$(( SECONDS - t0 ))
        case $rc in
            0) STATUS[install]=ok; src_stamp > "$STATE/build.stamp"; rm -f "$STATE/cuda_build.failed"
               pack; return 0 ;;
            124|137) STATUS[install]=timeout
                DETAIL[install]="CUDA build stopped at its ${lim}s limit: the rerun continues it (incremental, $GENIE_FAST_BUILD_DIR); no GENIE_FAST_CUDA=OFF build: until then the steps run on Triton"
                echo "[install] ${DETAIL[install]}"; pack; return 0 ;;
        esac
        cuda_rc=$rc
        echo "$(src_stamp) $cuda_rc" > "$STATE/cuda_build.failed"
        echo "[install] the CUDA build failed (exit $cuda_rc; logs/install.log): again with GENIE_FAST_CUDA=OFF" \
             "in what is left of the ${lim}s limit"
    fi
    STATUS[install]="fail:$cuda_rc"
    rest=$(( lim - (SECONDS - t0) ))
    if [ "$rest" -lt 10 ] && [ "$rest" -lt $(( lim / 2 )) ]; then  # 10 s at least (half of a tiny cap)
        DETAIL[install]="CUDA build failed (exit $cuda_rc); no time left in the step (${rest}s) for a GENIE_FAST_CUDA=OFF build"
    else
        timed_run "$rest" "$LOGS/install_nocuda.log" env GENIE_FAST_CUDA=OFF \
            GENIE_FAST_BUILD_DIR="$GENIE_FAST_BUILD_DIR-nocuda" "${PIP_INSTALL[@]}" >/dev/null; rc=$?
        case $rc in
            0) DETAIL[install]="CUDA build failed (exit $cuda_rc); built with GENIE_FAST_CUDA=OFF (the CUDA steps run on Triton)" ;;
            124|137) DETAIL[install]="CUDA build failed (exit $cuda_rc); the GENIE_FAST_CUDA=OFF build stopped at the step's limit (${rest}s left)" ;;
            *) DETAIL[install]="CUDA build failed (exit $cuda_rc) and the GENIE_FAST_CUDA=OFF build failed (exit $rc)" ;;
        esac
    fi
    SECS[install]=$(( SECONDS - t0 ))
    echo "[install] ${DETAIL[install]}"
    pack
}

if [ "${GPU_CHECK_SKIP_INSTALL:-0}" = 1 ]; then
    skip_step install "GPU_CHECK_SKIP_INSTALL=1"
elif [ "$FORCE_INSTALL" = 0 ] && ext_ready; then
    if cuda_known_bad; then  # ready with its CPU kernels: the CUDA build is not tried again
        STATUS[install]="fail:$(cut -d' ' -f2 "$STATE/cuda_build.failed")"
        DETAIL[install]="the CUDA build failed on these sources in an earlier call (logs/install.log); not retried (name install to retry): the CUDA steps run on Triton"
        echo "=== install: ${DETAIL[install]} ==="; pack
    elif selected install; then skip_step install "extension ready"
    else echo "=== install: extension ready ==="; fi
else
    install_step
fi
read -r HAS_CUDA GF_IMPORTS < <(cd /tmp && $PY -c "
import torch
try:
    import genie_fast  # noqa: F401
    ok = 1
except Exception:
    ok = 0
print(int(torch.cuda.is_available()), ok)" 2>/dev/null || echo "0 0")
[ -n "${GPU_CHECK_HAS_CUDA:-}" ] && HAS_CUDA=$GPU_CHECK_HAS_CUDA
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
        if command -v \$tool >/dev/null; then echo \"\$tool: \$(timeout 10 \$tool --version 2>&1 | tail -n 1)\"; else echo \"\$tool: none on PATH\"; fi
      done
      $PY -c 'import xdist' 2>/dev/null && echo 'pytest-xdist: present' || echo 'pytest-xdist: none'
      $PY bench/bench_sample.py --versions > '$OUT/versions.json' && cat '$OUT/versions.json'"
fi

# ------------------------------------------------------------------ 3. smoke: one kernel test, one engine test
PYTEST=("$PY" -m pytest -m cuda -q -rs -p no:cacheprovider)
if selected smoke; then
    run_step smoke "$(step_limit smoke)" "${PYTEST[@]}" "${SMOKE_TESTS[@]}" --junitxml="$LOGS/smoke_junit.xml"
fi

# ------------------------------------------------------------------ 4. benchmark: the headline rows
BENCH_JSON="$OUT/bench_sample.jsonl"
bench_rows() {  # bench_rows STEP ROWS: bench_sample.py --rows ROWS, appended to the same file
    local step=$1 rows=$2 lim resume=() smoke=()
    lim=$(step_limit "$step")
    # a rerun (or the rest after the headline) continues the rows so far
    if [ ! -f "$BENCH_JSON" ] && [ "$MODE" != all ] && [ -f "$STATE/bench_sample.jsonl" ]; then
        cp "$STATE/bench_sample.jsonl" "$BENCH_JSON"
    fi
    if [ -s "$BENCH_JSON" ]; then
        [ -n "$(tail -c 1 "$BENCH_JSON")" ] && echo >> "$BENCH_JSON"  # a line cut by a kill ends here
        resume=(--resume)
    fi
    [ "$HAS_CUDA" = 1 ] || smoke=(--smoke)
    local budget=$(( lim - 10 )); [ "$budget" -lt $(( lim / 2 )) ] && budget=$(( lim / 2 ))
    # shellcheck disable=SC2086  # GPU_CHECK_BENCH_ARGS is a list of words
    run_step "$step" "$lim" "$PY" bench/bench_sample.py "${smoke[@]}" --rows "$rows" --budget-s "$budget" \
        --json "$BENCH_JSON" "${resume[@]}" ${GPU_CHECK_BENCH_ARGS:-}
    [ -f "$BENCH_JSON" ] && cp "$BENCH_JSON" "$STATE/bench_sample.jsonl"
}
if selected bench; then bench_rows bench headline; fi
HEADLINE_DONE=$(elapsed)
pack

# ------------------------------------------------------------------ 5.-6. CUDA tests
XDIST=(); XDIST_ENGINE=()
if [ "$HAS_CUDA" = 1 ] && $PY -c "import xdist" >/dev/null 2>&1; then
    XDIST=(-n "${GPU_CHECK_XDIST:-8}"); XDIST_ENGINE=(-n "${GPU_CHECK_XDIST_ENGINE:-4}")
fi
if selected kernel_tests; then
    run_step kernel_tests "$(step_limit kernel_tests)" "${PYTEST[@]}" "${XDIST[@]}" tests \
        --ignore=tests/test_engine.py --junitxml="$LOGS/kernel_tests_junit.xml"
fi
if selected engine_tests; then
    run_step engine_tests "$(step_limit engine_tests)" "${PYTEST[@]}" "${XDIST_ENGINE[@]}" tests/test_engine.py \
        --junitxml="$LOGS/engine_tests_junit.xml"
fi

# ------------------------------------------------------------------ 7.-8. agreement checks (separate steps)
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

# ------------------------------------------------------------------ 9. benchmark: the rest of the rows
if selected bench_rest; then bench_rows bench_rest rest; fi

# ------------------------------------------------------------------ 10. profiler (last)
# A one-kernel ncu probe first (a permission error or no counters is a skip with its reason, in
# seconds); only where it reads counters, the NVTX check: an NVTX filter of the genie_fast ranges
# must select kernels, a made-up one none. Returns 0 ok, 1 not shown, 3 skip, 4 no time for it.
nvtx_ncu() {
    local probe="import torch; torch.ones(1, device='cuda').add_(1); torch.cuda.synchronize()"
    local run="$PY bench/profile_sample.py --model default --batch 2 --nfe 3 --iters 1 --mode both"
    local rc reason emitter filt base hit miss
    echo "ncu probe: ncu --metrics gpu__time_duration.sum on one kernel (limit ${NCU_PROBE_S}s)"
    timeout --kill-after=5 "$NCU_PROBE_S" ncu --clock-control none --launch-count 1 \
        --metrics gpu__time_duration.sum "$PY" -c "$probe" > "$LOGS/ncu_probe.txt" 2>&1; rc=$?
    if ! grep -Eq "gpu__time_duration\.sum[[:space:]]+[^[:space:]]+[[:space:]]+[0-9]" "$LOGS/ncu_probe.txt"; then
        if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then reason="the ncu probe did not finish in ${NCU_PROBE_S}s"
        else
            reason=$(grep -m1 -E "ERR_NVGPUCTRPERM|LibraryNotLoaded|==ERROR==" "$LOGS/ncu_probe.txt" ||
                     grep -m1 "==WARNING==" "$LOGS/ncu_probe.txt" || tail -n 1 "$LOGS/ncu_probe.txt")
            reason="ncu reads no counters (exit $rc): ${reason:-no output}"
        fi
        echo "NVTX: skip (${reason:0:250})"; return 3
    fi
    echo "ncu probe: counters read ($(grep -m1 -E "gpu__time_duration\.sum" "$LOGS/ncu_probe.txt" | tr -s ' '))"
    if [ $(( LIMIT - SECONDS )) -lt 40 ]; then
        echo "NVTX: not run (ncu reads counters; $(( LIMIT - SECONDS ))s left of the step, the check needs 40s)"
        return 4
    fi
    read -r emitter filt < <($PY -c "from genie_fast import profiling as p; print(p.emitter(), p.ncu_nvtx_filter('sample'))")
    echo "NVTX emitter: $emitter; ncu filter: $filt"
    base="ncu --nvtx --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --launch-count 5"
    $base --nvtx-include "$filt" $run > "$LOGS/ncu_sample.txt" 2>&1
    hit=$(grep -c "gpu__time_duration.sum" "$LOGS/ncu_sample.txt")
    if [ "$hit" = 0 ] && grep -q "LibraryNotLoaded\|ERR_NVGPUCTRPERM\|not supported\|Failed to initialize" "$LOGS/ncu_sample.txt"; then
        echo "NVTX: skip ($(grep -m1 "==ERROR==\|==WARNING==" "$LOGS/ncu_sample.txt"))"; return 3
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
        PLIM=$(step_limit profile)
        run_step profile "$PLIM" bash -c "$(declare -f nvtx_ncu); PY='$PY' LOGS='$LOGS' NCU_PROBE_S='$NCU_PROBE_S' LIMIT='$PLIM' nvtx_ncu"
        case ${STATUS[profile]} in
            fail:3) STATUS[profile]=skip
                    DETAIL[profile]=$(grep -m1 "^NVTX: skip" "$LOGS/profile.log" | sed 's/^NVTX: skip (\(.*\))$/\1/') ;;
            fail:4) STATUS[profile]=notrun
                    DETAIL[profile]="ncu reads counters; too little time left for the NVTX check: the rerun runs it" ;;
        esac
        pack
    fi
fi

# ------------------------------------------------------------------ summary (last in the output)
summary() {
    echo "=== gpu_check summary: $(date -u +%Y-%m-%dT%H:%MZ), $MODE, $(elapsed)s of ${TOTAL_S}s" \
         "(headline steps done at ${HEADLINE_DONE:-?}s; aimed at ${HEADLINE_S}s) ==="
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
    for t in smoke kernel_tests engine_tests; do
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
    grep -h "^NVTX\|^ncu probe" "$LOGS/profile.log" 2>/dev/null
    if [ -f "$BENCH_JSON" ]; then
        $PY bench/bench_sample.py --table "$BENCH_JSON" 2>&1 | tail -n 60
    fi
    echo "files under \$OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
    local again=()
    for s in "${ALL_STEPS[@]}"; do
        case ${STATUS[$s]} in ok|skip) ;; *) again+=("$s") ;; esac
    done
    if [ ${#again[@]} -gt 0 ]; then
        echo "rerun: bash bench/gpu_check.sh --rerun   (timeout_s 180; repeats: ${again[*]})"
    else echo "every step ok or skipped"; fi
}
pack
summary > "$OUT/summary.txt" 2>&1
echo
cat "$OUT/summary.txt"
pack
exit 0
