"""genie_fast.tune_grid: the dynamic programme, the search, and what a tuned grid carries."""
import itertools

import pytest
import torch

import genie_fast
from genie_fast.models.gmm import GaussianMixture
from genie_fast.reference import rk4_solve
from genie_fast.schedule import GRIDS
from genie_fast.solvers import resolve
from genie_fast.tuning import _candidates, shortest_path


@pytest.mark.parametrize("m,steps,seed", [(6, 2, 0), (7, 3, 1), (8, 4, 2), (8, 7, 3), (9, 1, 4)])
def test_shortest_path_is_the_brute_force_optimum(m, steps, seed):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(m, m, generator=g, dtype=torch.float64)
    cost = torch.where(torch.ones(m, m, dtype=torch.bool).triu(1), cost, torch.full_like(cost, float("inf")))

    def total(path):
        return sum(float(cost[a, b]) for a, b in zip(path, path[1:]))

    best = min(total((0, *mid, m - 1)) for mid in itertools.combinations(range(1, m - 1), steps - 1))
    path = shortest_path(cost, steps)
    assert path[0] == 0 and path[-1] == m - 1 and len(path) == steps + 1
    assert all(a < b for a, b in zip(path, path[1:]))
    assert total(path) == pytest.approx(best, rel=1e-12)


def test_shortest_path_refuses_impossible_budgets():
    cost = torch.zeros(4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="steps=4 needs at least 5 candidate times"):
        shortest_path(cost, 4)
    with pytest.raises(ValueError, match="steps"):
        shortest_path(cost, 0)


def test_candidates_hold_every_fixed_grid():
    m = GaussianMixture.random(2, (1, 2, 2), seed=0)
    ts = _candidates(m.schedule, 5, 8)
    assert bool((ts[1:] < ts[:-1]).all()) and float(ts[0]) == 1.0 and float(ts[-1]) == m.schedule.t_end
    for g in GRIDS:
        fixed = genie_fast.time_grid(m.schedule, 5, g)
        assert all(float((ts - t).abs().min()) <= 1e-9 for t in fixed)


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixture.random(4, (1, 4, 4), seed=0, spread=3.0)


def _median_error(model, noise, ref, solver, steps, grid, afs=None):
    x, _ = genie_fast.sample(model, noise=noise, solver=solver, steps=steps, grid=grid, afs=afs, dtype=torch.float64)
    return float((x - ref).pow(2).flatten(1).mean(1).sqrt().median())


@pytest.mark.parametrize("solver,method,gain", [("genie_multistep", "search", 2.0), ("unipc", "search", 1.5),
                                                ("ddim", "dp", 1.05)])
def test_tuned_grid_beats_every_fixed_grid_on_held_out_noise(mixture, solver, method, gain):
    """Tuned on 64 noises of seed 0, judged on 256 others against RK4 (a 4-component mixture whose
    exact score makes every grid's error the solver's own). The margins are what the search found
    with a third of the slack: genie_multistep 4x, unipc 2.2x, ddim (proxy DP alone) 1.12x."""
    ts = genie_fast.tune_grid(mixture, solver=solver, steps=4, n=64, seed=0, method=method, progress=False)
    assert ts.dtype == torch.float64 and len(ts) == 5 and bool((ts[1:] < ts[:-1]).all()) and ts.afs is True
    noise = torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = rk4_solve(mixture, noise, mixture.schedule, 1.0, mixture.schedule.t_end, 256)
    fixed = min(_median_error(mixture, noise, ref, solver, 4, g, afs=True) for g in GRIDS)
    assert _median_error(mixture, noise, ref, solver, 4, ts) * gain < fixed


def test_a_tuned_grid_carries_its_afs(mixture):
    ts = genie_fast.tune_grid(mixture, solver="ddim", steps=3, n=8, method="dp", afs=False, progress=False)
    assert ts.afs is False
    ts_on = genie_fast.tune_grid(mixture, solver="ddim", steps=3, n=8, method="dp", progress=False)
    assert ts_on.afs is True and resolve("ddim", grid=ts_on).afs is True
    assert resolve("ddim", grid=ts_on.clone()).afs is False  # a plain tensor of times: AFS off
    assert resolve("ddim", grid=ts_on, afs=False).afs is False  # an explicit afs wins
    z = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    a, _ = genie_fast.sample(mixture, noise=z, solver="ddim", grid=ts_on)
    b, _ = genie_fast.sample(mixture, noise=z, solver="ddim", grid=ts_on.clone(), afs=True)
    assert torch.equal(a, b)


def test_tune_grid_refusals(mixture):
    with pytest.raises(ValueError, match="method must be one of"):
        genie_fast.tune_grid(mixture, solver="ddim", steps=3, method="gradient", progress=False)
    with pytest.raises(ValueError, match="nfe"):
        genie_fast.tune_grid(mixture, solver="ddim", nfe=0, progress=False)
    with pytest.raises(ValueError, match="n must be"):
        genie_fast.tune_grid(mixture, solver="ddim", steps=3, n=0, progress=False)
    plain = lambda x, t: mixture(x, t)  # noqa: E731  (an eps callable without a head or image_shape)
    plain.schedule = mixture.schedule
    plain.image_shape = (1, 4, 4)
    with pytest.raises(TypeError, match="genie_multistep needs a model with a head"):
        genie_fast.tune_grid(plain, solver="genie_multistep", steps=3, progress=False)


def test_a_guided_budget_counts_two_evaluations_per_step():
    """With labels and a scale != 1 a step costs 2 NFE: the tuned grid fits the budget as sample() counts it."""
    m = GaussianMixture.random(4, (1, 4, 4), seed=0, spread=3.0, classes=[0, 0, 1, 1])
    labels = torch.tensor([0, 1] * 4)
    ts = genie_fast.tune_grid(m, solver="ddim", nfe=5, n=8, labels=labels, guidance_scale=2.0, method="dp",
                              progress=False)
    assert len(ts) - 1 == 3  # AFS + 2 guided steps = 4 NFE <= 5
    _, nfe = genie_fast.sample(m, noise=torch.randn(8, 1, 4, 4), solver="ddim", nfe=5, grid=ts, labels=labels,
                               guidance_scale=2.0)
    assert nfe == 4
