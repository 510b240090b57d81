"""bench/bench_sample.py on the CPU: its plan (--rows headline | rest | all, the main solver), the
engine timed without its finiteness check, and --smoke runs of each row selection, resumed on one
file as bench/gpu_check.sh runs them (headline first, the rest later)."""
from __future__ import annotations

import json
import types
from collections import Counter
from pathlib import Path

import pytest
from _helpers import bench_module

HEADLINE_VARIANTS = {"a", "b", "d", "floor"}


def _bench_module():
    return bench_module("bench_sample")


def _reload(module):
    return bench_module(module.__name__, reload=True)


def _read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _plan_args(**kw):
    """The defaults of bench_sample's GPU plan (main()'s parser, without --smoke)."""
    from genie_fast.solvers import SOLVERS

    args = dict(variants=["a", "b", "c_ro", "c_ma", "d", "floor"], nfe=[10], batch=[1, 64], extra_batch=[256],
                compile_models=["default", "deep"], compile_batch=64, solvers=list(SOLVERS), solver_batch=64)
    args.update(kw)
    return types.SimpleNamespace(**args)


def _planner(bs, **kw):
    bench = bs.Bench.__new__(bs.Bench)  # the plan reads only the arguments
    bench.args = _plan_args(**kw)
    return bench


def test_main_solver_is_the_package_default(monkeypatch):
    """The headline rows follow genie_fast.solvers.DEFAULT_SOLVER (no solver named in the bench)."""
    from genie_fast import solvers

    bs = _bench_module()
    assert bs.MAIN_SOLVER == solvers.DEFAULT_SOLVER
    monkeypatch.setattr(solvers, "DEFAULT_SOLVER", "dpmpp_2m")
    try:
        _reload(bs)
        assert bs.MAIN_SOLVER == "dpmpp_2m"
        headline = _planner(bs).plan(["deep", "default"], "headline")
        assert {it[1] for it in headline} == {"dpmpp_2m"}
        rest = _planner(bs).plan(["deep", "default"], "rest")
        assert ("deep", "genie", 10, 64, ["d"]) in rest  # genie is then one of the others
    finally:
        monkeypatch.undo()
        _reload(bs)
    assert bs.MAIN_SOLVER == solvers.DEFAULT_SOLVER


def test_rows_headline_rest_all():
    bs = _bench_module()
    main = bs.MAIN_SOLVER
    models = ["deep", "default"]
    headline = _planner(bs).plan(models, "headline")
    rest = _planner(bs).plan(models, "rest")
    everything = _planner(bs).plan(models, "all")
    # headline: both models, batch 1 and 64, NFE 10, the main solver: a, floor, d, b
    assert headline == [(m, main, 10, b, ["a", "floor", "d", "b"]) for m in models for b in (1, 64)]
    assert everything == headline + rest
    assert not set(map(repr, headline)) & set(map(repr, rest))
    keys = Counter((m, s, n, b, v) for m, s, n, b, vs in everything for v in vs)
    assert max(keys.values()) == 1  # no row planned twice
    for m, s, n, b, vs in rest:  # nothing of the headline is in the rest
        assert not (s == main and n == 10 and b in (1, 64) and set(vs) & HEADLINE_VARIANTS), (m, s, n, b, vs)
    variants = {v for *_, vs in rest for v in vs}
    assert {"c_ro", "c_ma", "d", "floor_eps", "a", "b", "floor"} <= variants
    assert {s for _, s, *_ in rest} >= {"genie_exact", "ddim", "genie_multistep"} and main not in \
        {s for _, s, _, _, vs in rest if vs == ["d"]}
    assert {b for _, s, _, b, vs in rest if s == main and "a" in vs} == {256}  # the extra batch
    more = _planner(bs, nfe=[10, 20]).plan(models, "rest")
    assert {(m, 20, b) for m, s, n, b, vs in more if n == 20} == {(m, 20, b) for m in models for b in (1, 64)}
    with pytest.raises(ValueError, match="rows"):
        _planner(bs).plan(models, "some")


def test_engine_is_timed_without_its_finiteness_check(tmp_path, monkeypatch):
    """Inside the timed window (time_calls) every engine call has check_finite=False: the check is a
    reduction plus a device-to-host sync the floor and the eager loops do not pay. The result is
    checked finite once, outside the window, and the row says so."""
    from genie_fast.engine import SamplingEngine

    bs = _bench_module()
    window = {"open": False}
    calls = []
    real_sample, real_time_calls = SamplingEngine.sample, bs.time_calls

    def sample(self, *args, **kw):
        calls.append((window["open"], kw.get("check_finite", True)))
        return real_sample(self, *args, **kw)

    def time_calls(fn, reps, target_s):
        window["open"] = True
        try:
            return real_time_calls(fn, reps, target_s)
        finally:
            window["open"] = False

    monkeypatch.setattr(SamplingEngine, "sample", sample)
    monkeypatch.setattr(bs, "time_calls", time_calls)
    jl = tmp_path / "rows.jsonl"
    assert bs.main(["--smoke", "--rows", "headline", "--variants", "d", "--batch", "1", "--json", str(jl)]) == 0
    timed = [check for in_window, check in calls if in_window]
    assert timed and not any(timed), calls
    rows = [r for r in _read(jl) if r["kind"] == "row"]
    assert [r["variant"] for r in rows] == ["d"] and rows[0]["finite"] is True


def test_smoke_rows_headline_then_rest_resumed(tmp_path):
    """gpu_check.sh's order: --rows headline on a fresh file, later --rows rest --resume on the same
    file: the headline rows only, then everything else (the step-op row a skip row off a GPU),
    nothing measured twice, and a resumed headline run measures nothing."""
    bs = _bench_module()
    jl = tmp_path / "bench.jsonl"
    common = ["--smoke", "--solvers", bs.MAIN_SOLVER, "ddim", "--batch", "1", "--json", str(jl)]
    assert bs.main([*common, "--rows", "headline"]) == 0
    first = [r for r in _read(jl) if r["kind"] in ("row", "skip")]
    assert first and {r["solver"] for r in first} == {bs.MAIN_SOLVER}
    assert {r["variant"] for r in first} == HEADLINE_VARIANTS and {r["batch"] for r in first} == {1}
    assert all(r["kind"] == "row" and r.get("median_ms") for r in first), first

    assert bs.main([*common, "--rows", "rest", "--resume"]) == 0
    recs = _read(jl)
    rows = [r for r in recs if r["kind"] == "row"]
    skips = [r for r in recs if r["kind"] == "skip"]
    keys = Counter(bs.item_key(r["model"], r["solver"], r["nfe"], r["batch"], r["variant"]) for r in rows)
    assert max(keys.values()) == 1, keys  # the headline was not measured again
    assert {(r["solver"], r["variant"]) for r in rows} >= {("ddim", "d"), ("ddim", "floor_eps")}
    step = [r for r in skips if r["variant"] == bs.STEP_OP_VARIANT]
    assert len(step) == 1 and "GPU" in step[0]["reason"] and step[0]["solver"] == "genie_step"
    assert {r["variant"] for r in skips if r["reason"] == "CPU run"} == {"c_ro", "c_ma"}
    assert [r["kind"] for r in recs].count("end") == 2

    before = len([r for r in _read(jl) if r["kind"] == "row"])
    assert bs.main([*common, "--rows", "headline", "--resume"]) == 0
    assert len([r for r in _read(jl) if r["kind"] == "row"]) == before


def test_smoke_rows_all(tmp_path, capsys):
    """--rows all (the default): headline and rest in one run, the step-op skip row last."""
    bs = _bench_module()
    jl = tmp_path / "all.jsonl"
    assert bs.main(["--smoke", "--solvers", "ddim", "--batch", "1", "--variants", "d", "floor",
                    "--json", str(jl)]) == 0
    recs = [r for r in _read(jl) if r["kind"] in ("row", "skip")]
    assert {(r["solver"], r["variant"]) for r in recs if r["kind"] == "row"} == {
        (bs.MAIN_SOLVER, "d"), (bs.MAIN_SOLVER, "floor"), ("ddim", "d"), ("ddim", "floor_eps")}
    assert recs[-1]["variant"] == bs.STEP_OP_VARIANT and recs[-1]["kind"] == "skip"
    out = capsys.readouterr().out
    assert "plan (all rows)" in out
    assert bs.main(["--table", str(jl)]) == 0  # a file with a step-op record still gives its table


def test_step_op_row_code_path(monkeypatch, capsys):
    """The step-op bandwidth row's code, run on the CPU under Triton's interpreter (CUDA pretended,
    perf_counter clocks, a small state): one row with its GB/s and the copy's, and its table line."""
    from genie_fast import ops

    bs = _bench_module()
    if "triton" not in ops.available_backends("genie_step", "cpu"):
        pytest.skip("Triton cannot run genie_step on the CPU here")
    monkeypatch.setattr(bs, "CUDA", True)
    bench = bs.Bench.__new__(bs.Bench)
    bench.args = types.SimpleNamespace(dtype="bf16", budget_s=1e9)
    bench.rows, bench.skipped, bench.done = [], [], set()
    bench.t_start = 0.0
    bench.env = {"gpu": "cpu (test)", "torch": "x", "triton": "x", "cuda": None}
    written = []
    bench.writer = types.SimpleNamespace(write=written.append)
    bench.log = print
    rec = bench.step_op_bandwidth(2, device="cpu")
    assert rec is written[0] and rec["kind"] == "row" and rec["variant"] == bs.STEP_OP_VARIANT
    assert rec.get("error") is None and rec["GBps"] > 0 and rec["copy_GBps"] > 0 and rec["bytes"] > 0
    assert rec["shape"] == [2, 3, 32, 32] and rec["dtype"] == "bfloat16"
    bench.done = {bs.item_key("step_op", "genie_step", 0, 2, bs.STEP_OP_VARIANT)}
    assert bench.step_op_bandwidth(2, device="cpu") is None  # a resumed run does not measure it again
    assert "step op genie_step triton B=2 bfloat16" in bs.table([rec])
