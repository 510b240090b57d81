"""genie_fast.precision: one table of half-precision and graph-vs-eager bounds, used by the CUDA
tests (tests/test_engine.py) and the agreement check (bench/profile_sample.py --check)."""
from __future__ import annotations

import types

import pytest
from _helpers import bench_module
import torch

from genie_fast import precision
from genie_fast.precision import (BUNDLED_HALF_PRECISION_BOUNDS, BUNDLED_MEASURED, GRAPH_VS_EAGER_FP32_BOUND,
                                  HALF_PRECISION_BOUNDS, graph_vs_eager_half_bound, half_bounds)
from genie_fast.solvers import SOLVERS



def _profile_sample():
    return bench_module("profile_sample")


def test_every_solver_has_bounds():
    """A solver added to SOLVERS without measured bounds fails here (and half_bounds names the fix)."""
    assert set(HALF_PRECISION_BOUNDS) == set(SOLVERS)
    for solver in SOLVERS:
        fp16, bf16 = half_bounds(solver)
        assert 0 < fp16 < bf16 < 0.1, solver  # bf16 keeps 3 fewer mantissa bits than fp16
        assert 0 < graph_vs_eager_half_bound(solver) < fp16
    assert GRAPH_VS_EAGER_FP32_BOUND < min(b[0] for b in HALF_PRECISION_BOUNDS.values())
    with pytest.raises(KeyError, match="HALF_PRECISION_BOUNDS"):
        half_bounds("no_such_solver")
    with pytest.raises(KeyError, match="BUNDLED_MEASURED"):
        half_bounds("no_such_solver", "default")


def test_bundled_model_has_its_own_measured_bounds():
    """The bundled model's table: every solver measured, bounds 4x the measured figure (rounded up),
    read for --model default only; other model names (random-weight U-Nets) get the shared table."""
    assert set(BUNDLED_MEASURED) == set(BUNDLED_HALF_PRECISION_BOUNDS) == set(SOLVERS)
    for solver, (fp16, bf16) in BUNDLED_MEASURED.items():
        b16, bbf = half_bounds(solver, "default")
        assert (b16, bbf) == BUNDLED_HALF_PRECISION_BOUNDS[solver]
        assert 4 * fp16 <= b16 <= 4.4 * fp16 and 4 * bf16 <= bbf <= 4.4 * bf16, solver  # (2 digits, up)
        for other in (None, "deep", "tiny", "fmnist_small"):
            assert half_bounds(solver, other) == HALF_PRECISION_BOUNDS[solver]
        assert graph_vs_eager_half_bound(solver, "default") == 0.1 * b16
    # why a second table: the trained model's trajectories amplify the network's rounding, so its
    # measured errors break the random-weight bounds (ddim: 1.4e-2 in fp16 against a bound of 2e-3)
    broken = [s for s, (fp16, bf16) in BUNDLED_MEASURED.items() if fp16 > half_bounds(s)[0]]
    assert "ddim" in broken and "genie_exact" in broken


def test_genie_exact_has_the_wider_bounds():
    """bench/RESULTS.md "Half-precision network error per solver": genie_exact's JVP in half
    precision measures 2.6e-3 (fp16) and 2.0e-2 (bf16), above the shared bounds; the others stay
    at or below 4.1e-4 and 3.3e-3, which the shared bounds cover five times."""
    fp16, bf16 = half_bounds("genie_exact")
    assert fp16 > 3 * 2.6e-3 and bf16 > 3 * 2.0e-2
    for solver in SOLVERS:
        if solver != "genie_exact":
            assert half_bounds(solver)[0] >= 4 * 4.1e-4 and half_bounds(solver)[1] >= 4 * 3.3e-3, solver


def test_engine_tests_read_the_table():
    import test_engine

    assert test_engine.half_bounds is precision.half_bounds
    assert not hasattr(test_engine, "HALF_BOUNDS")  # no second table


@pytest.mark.parametrize("model", [None, "deep", "default"])
def test_profile_sample_check_bounds_are_the_table(model):
    ps = _profile_sample()
    for solver in SOLVERS:
        b = ps.check_bounds(solver, model)
        fp16, bf16 = half_bounds(solver, model)
        assert b["graph fp16 vs eager fp32"] == fp16 and b["graph bf16 vs eager fp32"] == bf16
        assert b["eager bf16 vs eager fp32"] == bf16
        assert b["graph fp16 vs eager fp16"] == graph_vs_eager_half_bound(solver, model)
        assert b["graph fp32 vs eager fp32"] == GRAPH_VS_EAGER_FP32_BOUND
    assert ps.check_bounds("genie_exact")["graph fp16 vs eager fp32"] == HALF_PRECISION_BOUNDS["genie_exact"][0]
    assert ps.check_bounds("ddim", "default")["graph fp16 vs eager fp32"] == BUNDLED_HALF_PRECISION_BOUNDS["ddim"][0]


@pytest.mark.parametrize("model", ["tiny", "default"])
def test_profile_sample_check_applies_per_solver_bounds(monkeypatch, model):
    """run_check's CUDA path with the engine replaced by a stand-in whose half-precision runs are off
    by half of the solver's bound for the model: every check passes and reports the table's bound.
    With one shared fp16 bound of 2e-3, genie_exact's 4.5e-3 (its real error on a random-weight
    U-Net is 2.6e-3) would fail, and so would the bundled model's ddim (1.4e-2 measured)."""
    ps = _profile_sample()
    monkeypatch.setattr(ps, "CUDA", True)

    def engine(model, device=None, net_dtype=None, use_graphs=True, **kw):  # as make_engine or SamplingEngine
        return types.SimpleNamespace(dt=net_dtype, graphs=use_graphs, cache_info=lambda: {"graphs": int(use_graphs)})

    def engine_sample(eng, z, solver, nfe):
        fp16, bf16 = half_bounds(solver, model)
        off = {torch.float32: 0.0, torch.float16: 0.5 * fp16, torch.bfloat16: 0.5 * bf16}[eng.dt]
        return (z.double().abs() + 1) * (1 + off), nfe

    for name in ("make_engine", "SamplingEngine"):  # whichever the script builds its engines with
        if hasattr(ps, name):
            monkeypatch.setattr(ps, name, engine)
    monkeypatch.setattr(ps, "engine_sample", engine_sample)
    net = types.SimpleNamespace(image_shape=(1, 4, 4))
    args = types.SimpleNamespace(solver="all", model=model, batch=2, nfe=10)
    records = []
    assert ps.run_check(net, args, torch.device("cpu"), records.append) == 0
    checks = [r for r in records if "bound" in r]
    assert {r["solver"] for r in checks} == set(SOLVERS)
    assert all(r["ok"] for r in checks), [r for r in checks if not r["ok"]]
    for r in checks:
        assert r["bound"] == ps.check_bounds(r["solver"], model)[r["check"]]
    exact = next(r for r in checks if r["solver"] == "genie_exact" and r["check"] == "graph fp16 vs eager fp32")
    assert exact["bound"] == half_bounds("genie_exact", model)[0] and exact["rel_l2"] > 2e-3
