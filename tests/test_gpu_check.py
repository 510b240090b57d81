"""bench/gpu_check.sh and bench/bench_sample.py on the CPU: what one GPU call brings back.

The device tool returns at most 8 files from $OUT, a step timeout is a SIGINT, and a rerun must
repeat only what failed. These run without a GPU (the GPU parts skip) and stay within seconds;
the whole script end to end is behind the `slow` marker.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
BENCH = ROOT / "bench" / "bench_sample.py"
STEPS = ["install", "versions", "kernel_tests", "engine_tests", "check", "check_deep", "bench", "profile"]
FUSED = {"genie_step", "ddim_step", "denoise_step", "dpmpp_2m_step", "genie_multistep_step", "schedule_table"}


def _env(tmp_path, **extra):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # set by conftest; the script's pytest sets its own
    env.update(OUT=str(tmp_path / "out"), GPU_CHECK_STATE=str(tmp_path / "state"), PYTHON=sys.executable,
               GPU_CHECK_SKIP_INSTALL="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _script(tmp_path, *args, timeout=240, **extra):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=_env(tmp_path, **extra),
                          capture_output=True, text=True, timeout=timeout)


def _plan(tmp_path, *args):
    r = _script(tmp_path, "--plan", *args, timeout=60)
    assert r.returncode == 0, r.stderr
    return {line.split()[1]: line.split()[0] for line in r.stdout.splitlines() if line.startswith("  ")}


def _read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- step selection

def test_plan_every_step_in_order(tmp_path):
    r = _script(tmp_path, "--plan", timeout=60)
    names = [line.split()[1] for line in r.stdout.splitlines() if line.startswith("  ")]
    assert names == STEPS
    assert all(line.split()[0] == "run" for line in r.stdout.splitlines() if line.startswith("  "))
    # the written time plan fits the first call in about 300 s
    header = SCRIPT.read_text().split("TIME PLAN", 1)[1].split("FILES under", 1)[0]
    plan = {line.split()[1]: int(line.split()[2]) for line in header.splitlines()
            if len(line.split()) > 2 and line.split()[1] in STEPS}
    assert list(plan) == STEPS and sum(plan.values()) <= 300


def test_rerun_repeats_only_failed_steps(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    status = {"install": "ok", "versions": "ok", "kernel_tests": "fail:1", "engine_tests": "ok",
              "check": "ok", "check_deep": "timeout", "bench": "pending", "profile": "skip"}
    (state / "status.tsv").write_text("".join(f"{s}\t{st}\t1\t1\t\n" for s, st in status.items()))
    plan = _plan(tmp_path, "--rerun")
    assert {s for s, what in plan.items() if what == "run"} == {"install", "kernel_tests", "check_deep", "bench"}
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
    """versions, check and bench on the CPU: <= 8 files with one archive, every row names each op's
    backend, the summary holds the table and says what a rerun would repeat."""
    args = "--solvers genie ddim --batch 2 --variants a d"
    r = _script(tmp_path, "versions", "check", "bench", GPU_CHECK_BENCH_ARGS=args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "out"
    files, archive = _check_out(out)
    assert {"summary.txt", "status.tsv", "versions.json", "checks.jsonl", "bench_sample.jsonl"} <= set(files)
    with tarfile.open(archive) as tf:
        names = tf.getnames()
    assert {"logs/versions.log", "logs/check.log", "logs/bench.log", "status.tsv"} <= set(names), names

    status = {line.split("\t")[0]: line.split("\t")[1] for line in (out / "status.tsv").read_text().splitlines()}
    assert status["versions"] == status["check"] == status["bench"] == "ok", status
    assert status["install"] == "skip" and status["kernel_tests"] == "notrun"

    versions = json.loads((out / "versions.json").read_text())
    assert set(versions["op_backends_auto"]) == FUSED and versions["nvtx"]["emitter"] in (None, "nvtx", "torch.cuda.nvtx")

    recs = _read_jsonl(out / "bench_sample.jsonl")
    assert recs[0]["kind"] == "env" and recs[-1]["kind"] == "end" and not recs[-1]["interrupted"]
    rows = [r for r in recs if r["kind"] == "row"]
    assert {r["variant"] for r in rows} == {"a", "d"}
    assert {r["solver"] for r in rows if r["variant"] == "d"} == {"genie", "ddim"}
    for row in rows:
        assert set(row["op_backends"]) == FUSED, row
    d = [r for r in rows if r["variant"] == "d"]
    assert all(set(r["op_backends"].values()) <= {"cpp", "torch"} for r in d)
    summary = (out / "summary.txt").read_text()
    assert "times: median ms" in summary and "op backends" in summary
    assert "(repeats: kernel_tests engine_tests check_deep profile)" in summary  # what did not run



@pytest.mark.slow
def test_script_cpu_every_step_then_rerun(tmp_path):
    """The whole script as on the GPU machine's first call, then a rerun of a failed bench, which
    runs only the bench and resumes from its rows instead of measuring them again."""
    r = _script(tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:]
    out = tmp_path / "out"
    _check_out(out)
    status = dict(line.split("\t")[:2] for line in (out / "status.tsv").read_text().splitlines())
    assert status["check_deep"] == status["profile"] == "skip" and status["bench"] == "ok", status
    assert all(status[s] in ("ok", "skip") for s in STEPS), status
    rows = [r for r in _read_jsonl(out / "bench_sample.jsonl") if r["kind"] == "row"]

    state_status = tmp_path / "state" / "status.tsv"
    state_status.write_text(state_status.read_text().replace("bench\tok", "bench\tfail:1"))
    r2 = _script(tmp_path, "--rerun")
    assert r2.returncode == 0, r2.stdout[-3000:]
    assert "=== bench" in r2.stdout and "=== versions" not in r2.stdout and "=== check " not in r2.stdout
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
    args = ["--smoke", "--json", str(jl), "--solvers", "genie", "--batch", "1", "--variants", "a", "d"]
    assert bs.main(args) == 0
    first = [r for r in _read_jsonl(jl) if r["kind"] == "row"]
    assert {r["variant"] for r in first} == {"a", "d"}
    lines = jl.read_text().splitlines()
    jl.write_text("\n".join(line for line in lines if '"variant": "d"' not in line) + "\n")  # d lost
    assert bs.main([*args, "--resume"]) == 0
    rows = [r for r in _read_jsonl(jl) if r["kind"] == "row"]
    assert sorted(r["variant"] for r in rows) == ["a", "d"]  # a kept, only d measured again


def _bench_module():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_sample
    finally:
        sys.path.pop(0)
    return bench_sample


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


def test_engine_refusal_is_a_skip(monkeypatch):
    bs = _bench_module()
    from genie_fast import engine as engine_mod

    monkeypatch.setattr(engine_mod, "ENGINE_SOLVERS", ("genie",), raising=False)
    assert bs.engine_refusal("genie") is None and "heun" in bs.engine_refusal("heun")
    monkeypatch.delattr(engine_mod, "ENGINE_SOLVERS", raising=False)
    assert bs.engine_refusal("heun") is None  # nothing declared: the engine is tried


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
