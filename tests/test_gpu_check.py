"""bench/gpu_check.sh and bench/bench_sample.py on the CPU: what one GPU call brings back.

The device tool returns at most 8 files from $OUT, a step timeout is a SIGINT, and a rerun must
repeat only what failed. These run without a GPU (the GPU parts skip) and stay within seconds;
the whole script end to end is behind the `slow` marker.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from _helpers import bench_module
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
BENCH = ROOT / "bench" / "bench_sample.py"
STEPS = ["install", "versions", "smoke", "bench", "kernel_tests", "engine_tests", "check", "check_deep",
         "bench_rest", "profile"]
HEADLINE = ["install", "versions", "smoke", "bench"]
FUSED = {"genie_step", "ddim_step", "denoise_step", "dpmpp_2m_step", "genie_multistep_step", "schedule_table"}
FIRST_CALL_S, RERUN_CALL_S, KILL_AFTER_S, SUMMARY_S = 480, 180, 10, 8  # the device tool's timeout_s


def _env(tmp_path, **extra):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # set by conftest; the script's pytest sets its own
    env.update({"OUT": str(tmp_path / "out"), "GPU_CHECK_STATE": str(tmp_path / "state"), "PYTHON": sys.executable,
                "GPU_CHECK_SKIP_INSTALL": "1", "PYTHONUNBUFFERED": "1", **extra})
    return env


def _script(tmp_path, *args, timeout=240, **extra):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=_env(tmp_path, **extra),
                          capture_output=True, text=True, timeout=timeout)


def _plan_lines(tmp_path, *args, **extra):
    r = _script(tmp_path, "--plan", *args, timeout=60, **extra)
    assert r.returncode == 0, r.stderr
    return r.stdout, [line.split() for line in r.stdout.splitlines() if line.startswith("  ")]


def _plan(tmp_path, *args):
    return {f[1]: f[0] for f in _plan_lines(tmp_path, *args)[1]}


def _seconds(field):
    return int(field.rstrip("s"))


def _plan_numbers(tmp_path, *args, **extra):
    """{step: (plan, cap, need, by)} of the steps --plan says run."""
    out = {}
    for f in _plan_lines(tmp_path, *args, **extra)[1]:
        if f[0] == "run":
            kv = dict(zip(f[2::2], f[3::2]))
            out[f[1]] = tuple(_seconds(kv[k]) for k in ("plan", "cap", "need", "by"))
    return out


def _header_plan():
    """The TIME PLAN table of the script's header: {step: (plan, cap, need, call)}."""
    header = SCRIPT.read_text().split("TIME PLAN", 1)[1].split("FILES under", 1)[0]
    rows = {}
    for line in header.splitlines():
        f = line.lstrip("#").split()
        if len(f) > 4 and f[0] in STEPS and f[1].isdigit():
            rows[f[0]] = (int(f[1]), int(f[2]), int(f[3]), f[4])
    return rows


def _read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _status(out: Path):
    return {f[0]: f for f in (line.split("\t") for line in (out / "status.tsv").read_text().splitlines())}


# --------------------------------------------------------------------------- step selection, time plan

def test_plan_every_step_in_order(tmp_path):
    text, lines = _plan_lines(tmp_path)
    assert [f[1] for f in lines] == STEPS and all(f[0] == "run" for f in lines)
    assert "total 420s, headline by 360s" in text


def test_time_plan_headline_first_and_within_360s(tmp_path):
    """The header's table is what the script runs; the headline steps (install, versions, smoke,
    the headline bench rows) come first and their caps end by 360 s of the 420 s total, which
    leaves a 480 s tool call room for a step's kill-after and the summary."""
    header = _header_plan()
    numbers = _plan_numbers(tmp_path)
    assert list(header) == STEPS == list(numbers)
    for s in STEPS:
        assert header[s][:3] == numbers[s][:3], s  # plan, cap, need
        assert numbers[s][2] <= numbers[s][0] <= numbers[s][1], s  # need <= plan <= cap
    assert [s for s in STEPS if header[s][3] == "1"] == HEADLINE == STEPS[:4]
    assert sum(numbers[s][1] for s in HEADLINE) <= 360 and numbers["bench"][3] <= 360
    assert sum(numbers[s][0] for s in HEADLINE) <= 300  # the expected headline leaves a margin
    assert 420 + KILL_AFTER_S + SUMMARY_S <= FIRST_CALL_S
    assert max(by for *_, by in numbers.values()) <= 420


def test_rerun_budget(tmp_path):
    """--rerun has a total of its own (160 s) that fits a 180 s tool call with the kill-after and
    the summary; the tests and checks the first call left fit in it by plan."""
    state = tmp_path / "state"
    state.mkdir()
    status = {s: ("ok" if s in HEADLINE else "notrun") for s in STEPS}
    (state / "status.tsv").write_text("".join(f"{s}\t{st}\t1\t1\t\n" for s, st in status.items()))
    text, _ = _plan_lines(tmp_path, "--rerun")
    assert "(rerun; total 160s" in text
    assert 160 + KILL_AFTER_S + SUMMARY_S <= RERUN_CALL_S
    numbers = _plan_numbers(tmp_path, "--rerun")
    assert set(numbers) == {"install"} | set(STEPS[4:])  # install: only when the extension is not ready
    assert sum(numbers[s][0] for s in ("kernel_tests", "engine_tests", "check", "check_deep")) <= 160
    assert max(by for *_, by in numbers.values()) <= 160
    # the expected plan of everything fits the two calls
    total_plan = sum(p for p, *_ in numbers.values()) - numbers["install"][0]
    headline_plan = sum(_plan_numbers(tmp_path)[s][0] for s in HEADLINE)
    assert total_plan <= (420 - headline_plan) + 160
    assert "total 100s" in _plan_lines(tmp_path, "--rerun", GPU_CHECK_TOTAL_S="100")[0]


def test_pip_is_offline_and_quiet(tmp_path):
    """Every pip call: --no-index (no network there), --disable-pip-version-check, no prompt."""
    text, _ = _plan_lines(tmp_path)
    cmd = next(line for line in text.splitlines() if line.startswith("install command:"))
    assert " -m pip install " in cmd
    for flag in ("--no-index", "--disable-pip-version-check", "--no-build-isolation", "--no-deps"):
        assert flag in cmd.split(), cmd
    code = [line for line in SCRIPT.read_text().splitlines() if not line.lstrip().startswith("#")]
    pip_lines = [line for line in code if " pip " in f" {line} " and "install" in line]
    assert pip_lines, "no pip call found"
    for line in pip_lines:
        assert "--no-index" in line and "--disable-pip-version-check" in line, line
    assert any("PIP_NO_INPUT=1" in line for line in code)


def test_smoke_tests_exist(tmp_path):
    """The smoke step names real tests: one fused-kernel CUDA test and one engine test (imported here,
    not collected by a second pytest: a rename breaks this, not the GPU call)."""
    import importlib

    text, _ = _plan_lines(tmp_path)
    ids = next(line for line in text.splitlines() if line.startswith("smoke tests:")).split()[2:]
    assert len(ids) == 2 and ids[0].startswith("tests/test_genie_step.py::") and "engine" in ids[1]
    for test_id in ids:
        path, *names = test_id.split("::")
        obj = importlib.import_module(Path(path).stem)  # tests/ is on sys.path (rootdir conftest)
        for name in names:
            obj = getattr(obj, name.partition("[")[0], None)
            assert obj is not None, f"{test_id}: no {name} in {path}"
        marks = {m.name for m in getattr(obj, "pytestmark", [])}
        assert "cuda" in marks or path.endswith("test_genie_step.py"), f"{test_id} is not a cuda test"


def test_rerun_repeats_only_failed_steps(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    status = {"install": "ok", "versions": "ok", "smoke": "ok", "bench": "pending", "kernel_tests": "fail:1",
              "engine_tests": "ok", "check": "ok", "check_deep": "timeout", "bench_rest": "notrun",
              "profile": "skip"}
    (state / "status.tsv").write_text("".join(f"{s}\t{st}\t1\t1\t\n" for s, st in status.items()))
    plan = _plan(tmp_path, "--rerun")
    assert {s for s, what in plan.items() if what == "run"} == {"install", "bench", "kernel_tests", "check_deep",
                                                                "bench_rest"}
    r = _script(tmp_path, "--plan", "--rerun", timeout=60)
    assert "install" in r.stdout and "only when the extension is not ready" in r.stdout  # no forced build


def test_named_steps_and_unknown_step(tmp_path):
    plan = _plan(tmp_path, "bench", "check")
    assert {s for s, what in plan.items() if what == "run"} == {"install", "check", "bench"}
    r = _script(tmp_path, "no_such_step", timeout=60)
    assert r.returncode == 2 and "unknown step" in r.stderr


def test_rerun_without_state_runs_everything(tmp_path):
    plan = _plan(tmp_path, "--rerun")
    assert all(plan[s] == "run" for s in STEPS)


@pytest.mark.slow  # a script run of ~6 s; the need rule itself is read off --plan above
def test_step_without_its_need_is_left_for_the_rerun(tmp_path):
    """A step the total no longer leaves its need is not started (to be killed): it stays notrun,
    says so, and the rerun's plan runs it."""
    r = _script(tmp_path, "versions", "bench_rest", GPU_CHECK_TOTAL_S="30", timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"=== versions \(limit \d+s", r.stdout)
    assert "=== bench_rest (limit" not in r.stdout and "bench_rest: not started" in r.stdout
    st = _status(tmp_path / "out")
    assert st["versions"][1] == "ok" and st["bench_rest"][1] == "notrun" and "rerun" in st["bench_rest"][4]
    assert _plan(tmp_path, "--rerun")["bench_rest"] == "run"


# --------------------------------------------------------------------------- install: timeout vs failure

FAKE_PY = """#!/usr/bin/env bash
# a python whose `-m pip` is a build that sleeps, fails or succeeds (FAKE_PIP_CUDA / FAKE_PIP_OFF)
if [ "$1" = -m ] && [ "$2" = pip ]; then
    echo "GENIE_FAST_CUDA=${GENIE_FAST_CUDA:-} GENIE_FAST_BUILD_DIR=${GENIE_FAST_BUILD_DIR:-} $*" >> "$FAKE_PIP_LOG"
    if [ "${GENIE_FAST_CUDA:-}" = OFF ]; then mode=$FAKE_PIP_OFF; else mode=$FAKE_PIP_CUDA; fi
    case $mode in sleep) exec sleep 60 ;; fail) exit 1 ;; *) exit 0 ;; esac
fi
exec "%s" "$@"
"""


def _install_run(tmp_path, cuda, off, cap):
    fake = tmp_path / "fakepy"
    fake.write_text(FAKE_PY % sys.executable)
    fake.chmod(0o755)
    log = tmp_path / "pip.log"
    t0 = time.time()
    r = _script(tmp_path, "install", timeout=60, PYTHON=str(fake), GPU_CHECK_SKIP_INSTALL="0",
                GPU_CHECK_CAP_install=str(cap), GPU_CHECK_TOTAL_S="15", FAKE_PIP_LOG=str(log),
                FAKE_PIP_CUDA=cuda, FAKE_PIP_OFF=off, GENIE_FAST_BUILD_DIR=str(tmp_path / "build"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    calls = log.read_text().splitlines() if log.exists() else []
    return r, calls, time.time() - t0


def test_install_timeout_is_not_followed_by_a_fallback_build(tmp_path):
    """A CUDA build stopped at its cap is a timeout that the rerun continues (same build folder):
    no GENIE_FAST_CUDA=OFF build after it, nothing past the step's limit."""
    r, calls, secs = _install_run(tmp_path, cuda="sleep", off="ok", cap=3)
    assert len(calls) == 1 and "GENIE_FAST_CUDA= " in calls[0], calls  # the CUDA build only
    assert "--no-index" in calls[0] and "--disable-pip-version-check" in calls[0]
    assert f"GENIE_FAST_BUILD_DIR={tmp_path / 'build'} " in calls[0]
    st = _status(tmp_path / "out")
    assert st["install"][1] == "timeout" and "rerun continues" in st["install"][4], st["install"]
    assert not (tmp_path / "state" / "cuda_build.failed").exists()
    assert secs < 30, secs


def test_install_failure_falls_back_within_the_step_limit(tmp_path):
    """A failed CUDA build (not a timeout) is redone with GENIE_FAST_CUDA=OFF in its own build
    folder, within what is left of the install step's limit (no extra 120 s)."""
    r, calls, secs = _install_run(tmp_path, cuda="fail", off="sleep", cap=4)
    assert len(calls) == 2 and "GENIE_FAST_CUDA=OFF" in calls[1], calls
    assert f"GENIE_FAST_BUILD_DIR={tmp_path / 'build'}-nocuda " in calls[1]
    st = _status(tmp_path / "out")
    assert st["install"][1] == "fail:1" and "OFF build stopped" in st["install"][4], st["install"]
    assert (tmp_path / "state" / "cuda_build.failed").exists()
    assert secs < 30, secs


# --------------------------------------------------------------------------- profile: the ncu probe

FAKE_NCU = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_NCU_LOG"
if [ "$FAKE_NCU" = perm ]; then
    echo "==PROF== Connected to process 4242"
    echo "==ERROR== ERR_NVGPUCTRPERM - The user does not have permission to access NVIDIA GPU Performance Counters on the target device 0."
    exit 1
fi
case " $* " in *" --launch-count 1 "*) printf '    gpu__time_duration.sum     usecond     1.57\n' ;; esac
"""


@pytest.mark.parametrize("mode", ["perm", pytest.param("counters", marks=pytest.mark.slow)])
def test_profile_probes_ncu_first(tmp_path, mode):
    """ncu is probed on one kernel first: a permission error is a skip with its reason after that
    one call (not a timeout of the whole profiled run); where counters are read, the NVTX check
    follows (a filter run and a made-up-range run)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ncu").write_text(FAKE_NCU)
    (bin_dir / "ncu").chmod(0o755)
    log = tmp_path / "ncu.log"
    r = _script(tmp_path, "profile", timeout=120, GPU_CHECK_HAS_CUDA="1", FAKE_NCU=mode, FAKE_NCU_LOG=str(log),
                PATH=f"{bin_dir}:{os.environ['PATH']}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    calls = log.read_text().splitlines()
    assert "--metrics gpu__time_duration.sum" in calls[0] and " -c " in calls[0], calls
    st = _status(tmp_path / "out")["profile"]
    if mode == "perm":
        assert len(calls) == 1, calls
        assert st[1] == "skip" and "ERR_NVGPUCTRPERM" in st[4], st
    else:
        assert len(calls) == 3 and "--nvtx-include" in calls[1] and "no_such_range/" in calls[2], calls
        assert st[1] == "fail:1", st  # the fake selects no kernels: NVTX not shown
    with tarfile.open(tmp_path / "out" / "gpu_check_logs.tar.gz") as tf:
        assert "logs/ncu_probe.txt" in tf.getnames()


# --------------------------------------------------------------------------- one CPU call

def _check_out(out: Path):
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    archives = [p for p in files if p.name.endswith(".tar.gz")]
    assert len(archives) == 1, files
    for p in files:  # names the device tool brings back, at most two folders down
        assert all(c.isalnum() or c in "._-" for c in p.name), p
        assert len(p.relative_to(out).parts) <= 3
    return {p.name: p for p in files}, archives[0]


def test_script_cpu_run_named_steps(tmp_path):
    """versions, check and both bench steps on the CPU, in the script's order (headline rows before
    the checks, the rest after them, resumed into the same file): <= 8 files with one archive,
    every row names each op's backend, the summary holds the table and says what a rerun would
    repeat."""
    from genie_fast.solvers import DEFAULT_SOLVER

    args = f"--solvers {DEFAULT_SOLVER} ddim --batch 2 --variants a d"
    r = _script(tmp_path, "bench_rest", "check", "versions", "bench", GPU_CHECK_BENCH_ARGS=args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    order = [line.split()[1] for line in r.stdout.splitlines() if line.startswith("=== ") and "summary" not in line]
    assert order == ["install:", "versions", "bench", "check", "bench_rest"], order
    out = tmp_path / "out"
    files, archive = _check_out(out)
    assert {"summary.txt", "status.tsv", "versions.json", "checks.jsonl", "bench_sample.jsonl"} <= set(files)
    with tarfile.open(archive) as tf:
        names = tf.getnames()
    assert {"logs/versions.log", "logs/check.log", "logs/bench.log", "logs/bench_rest.log",
            "status.tsv"} <= set(names), names

    status = {s: f[1] for s, f in _status(out).items()}
    assert status["versions"] == status["check"] == status["bench"] == status["bench_rest"] == "ok", status
    assert status["install"] == "skip" and status["kernel_tests"] == "notrun" and status["smoke"] == "notrun"

    versions = json.loads((out / "versions.json").read_text())
    assert set(versions["op_backends_auto"]) == FUSED and versions["nvtx"]["emitter"] in (None, "nvtx", "torch.cuda.nvtx")

    recs = _read_jsonl(out / "bench_sample.jsonl")
    assert recs[0]["kind"] == "env" and recs[-1]["kind"] == "end" and not recs[-1]["interrupted"]
    assert [r["kind"] for r in recs].count("env") == 2  # the headline, then the rest resumed into it
    rows = [r for r in recs if r["kind"] == "row"]
    assert {r["variant"] for r in rows} == {"a", "d"}
    assert {r["solver"] for r in rows if r["variant"] == "d"} == {DEFAULT_SOLVER, "ddim"}
    first_rest = next(i for i, r in enumerate(recs) if r["kind"] == "env" and i > 0)
    assert all(r["solver"] == DEFAULT_SOLVER for r in recs[:first_rest] if r["kind"] == "row")  # headline rows first
    for row in rows:
        assert set(row["op_backends"]) == FUSED, row
    d = [r for r in rows if r["variant"] == "d"]
    assert all(set(r["op_backends"].values()) <= {"cpp", "torch"} for r in d)
    summary = (out / "summary.txt").read_text()
    assert "times: median ms" in summary and "op backends" in summary and "headline steps done at" in summary
    assert "(timeout_s 180; repeats: smoke kernel_tests engine_tests check_deep profile)" in summary


@pytest.mark.slow
def test_script_cpu_every_step_then_rerun(tmp_path):
    """The whole script as on the GPU machine's first call, then a rerun of a failed bench, which
    runs only the bench and resumes from its rows instead of measuring them again."""
    r = _script(tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:]
    order = [line.split()[1].rstrip(":") for line in r.stdout.splitlines()
             if line.startswith("=== ") and "summary" not in line]
    assert order == STEPS, order
    out = tmp_path / "out"
    _check_out(out)
    status = {s: f[1] for s, f in _status(out).items()}
    assert status["check_deep"] == status["profile"] == "skip" and status["bench"] == "ok", status
    assert all(status[s] in ("ok", "skip") for s in STEPS), status
    rows = [r for r in _read_jsonl(out / "bench_sample.jsonl") if r["kind"] == "row"]

    state_status = tmp_path / "state" / "status.tsv"
    state_status.write_text(state_status.read_text().replace("bench\tok", "bench\tfail:1"))
    r2 = _script(tmp_path, "--rerun")
    assert r2.returncode == 0, r2.stdout[-3000:]
    assert "total 160s" in r2.stdout
    assert "=== bench" in r2.stdout and "=== versions" not in r2.stdout and "=== check " not in r2.stdout
    assert "=== bench_rest" not in r2.stdout
    assert "resuming" in r2.stdout
    assert len([r for r in _read_jsonl(out / "bench_sample.jsonl") if r["kind"] == "row"]) == len(rows)
    _check_out(out)


# --------------------------------------------------------------------------- the benchmark

def test_bench_interrupt_keeps_rows_and_prints_table(tmp_path):
    """SIGINT (what a step timeout sends) mid-benchmark: the rows so far stay in the JSON Lines
    file, an end record says it was interrupted, and the table is printed."""
    jl = tmp_path / "rows.jsonl"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(BENCH), "--smoke", "--json", str(jl), "--solvers", "genie",
                             "--batch", *map(str, range(1, 40))], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if jl.exists() and sum('"kind": "row"' in line for line in jl.read_text().splitlines()) >= 2:
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        else:
            pytest.fail("no rows within 120 s")
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stdout[-2000:]
    recs = _read_jsonl(jl)
    rows = [r for r in recs if r["kind"] == "row"]
    assert len(rows) >= 2 and recs[-1] == {**recs[-1], "kind": "end", "interrupted": True}
    assert "interrupted" in stdout and "times: median ms" in stdout
    for r in rows:
        assert set(r["op_backends"]) == FUSED
    assert len(rows) < 4 * 39  # it stopped


def test_bench_resume_measures_only_what_is_missing(tmp_path):
    bs = _bench_module()
    jl = tmp_path / "rows.jsonl"
    from genie_fast.solvers import DEFAULT_SOLVER  # the bench always measures the default solver

    args = ["--smoke", "--json", str(jl), "--solvers", DEFAULT_SOLVER, "--batch", "1", "--variants", "a", "d"]
    assert bs.main(args) == 0
    first = [r for r in _read_jsonl(jl) if r["kind"] == "row"]
    assert {r["variant"] for r in first} == {"a", "d"}
    lines = jl.read_text().splitlines()
    jl.write_text("\n".join(line for line in lines if '"variant": "d"' not in line) + "\n")  # d lost
    assert bs.main([*args, "--resume"]) == 0
    rows = [r for r in _read_jsonl(jl) if r["kind"] == "row"]
    assert sorted(r["variant"] for r in rows) == ["a", "d"]  # a kept, only d measured again


def _bench_module():
    return bench_module("bench_sample")


def test_table_of_a_killed_run(tmp_path, capsys):
    """A file cut by a kill (no end record, a half line) still gives its table."""
    bs = _bench_module()
    jl = tmp_path / "cut.jsonl"
    row = {"kind": "row", "model": "deep", "solver": "genie", "nfe": 10, "batch": 1, "dtype": "float16",
           "op_backends": {op: "cuda" for op in FUSED}}
    lines = [{"kind": "env", "gpu": "x"}, {**row, "variant": "a", "median_ms": 100.0},
             {**row, "variant": "floor", "median_ms": 9.0, "forward": "eps+head"},
             {**row, "variant": "d", "median_ms": 10.0, "nfe_used": 10},
             {"kind": "skip", "model": "deep", "solver": "heun", "nfe": 10, "batch": 64, "variant": "d",
              "reason": "engine refuses: x"}]
    jl.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"kind": "row", "mod')
    assert bs.main(["--table", str(jl)]) == 0
    out = capsys.readouterr().out
    assert "killed" in out and "refused" in out
    line = next(line for line in out.splitlines() if line.strip().startswith("deep") and "genie" in line)
    assert "10.00" in line and "11.1" in line  # d/a = 10x, overhead 10/9 - 1 = 11.1 %


def test_op_backends_per_variant():
    bs = _bench_module()
    assert set(bs.fused_ops()) == FUSED  # taylor_step stays a reference: not listed as fused
    assert set(bs.op_backends("cpu", "torch").values()) == {"torch"}
    assert set(bs.op_backends("cpu", None).values()) == {"none"}
    auto = bs.op_backends("cpu", "auto")
    assert set(auto) == FUSED and set(auto.values()) <= {"cpp", "torch"}


# --------------------------------------------------------------------------- NVTX emitter

def test_nvtx_falls_back_to_torch_cuda_nvtx(monkeypatch):
    """No nvtx package and a CUDA torch (the H200 image): ranges go through torch.cuda.nvtx, in
    NVTX's default domain, and the engine's push/pop reach it."""
    from genie_fast import profiling

    calls = []
    monkeypatch.setattr(profiling, "_nvtx", None)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch._C, "_nvtx", object(), raising=False)
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda msg: calls.append(("push", msg)))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: calls.append(("pop", None)))
    try:
        assert profiling.configure("auto") == "torch.cuda.nvtx" == profiling.emitter()
        assert profiling.ncu_nvtx_filter("sample") == "sample/"
        assert "nvtx package is missing" in profiling.emitter_info()["why"]
        with profiling.nvtx_range("sample"):
            profiling.push("step")
            profiling.pop()
        assert calls == [("push", "sample"), ("push", "step"), ("pop", None), ("pop", None)]
        assert profiling.configure("nvtx") is None  # asked for the package, which is missing
    finally:
        monkeypatch.undo()
        profiling.configure(os.environ.get("GENIE_FAST_NVTX", "auto"))


def test_nvtx_emitter_choice():
    from genie_fast import profiling

    try:
        assert profiling.configure("off") is None and profiling.emitter() is None
        with profiling.nvtx_range("x"):
            pass
        with pytest.raises(ValueError):
            profiling.configure("bogus")
        if profiling._nvtx is not None:
            assert profiling.configure("nvtx") == "nvtx"
            assert profiling.ncu_nvtx_filter("sample", "replay") == "genie_fast@sample/replay/"
        if not torch.version.cuda:  # a CPU torch has no NVTX binding: no-ops, said so
            assert profiling.configure("torch") is None
            assert "CPU build" in profiling.emitter_info()["why"]
    finally:
        profiling.configure(os.environ.get("GENIE_FAST_NVTX", "auto"))
