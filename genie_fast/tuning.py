"""Learned time grids: `tune_grid` picks the times of a few-step run by dynamic programming over a
fine teacher trajectory of the same network (GITS-style, arXiv 2405.11326), with a cost of our own.

    ts = genie_fast.tune_grid(solver="genie_multistep", nfe=5)      # bundled model, null class
    x0, nfe = genie_fast.sample(n=64, solver="genie_multistep", nfe=5, grid=ts)

The method (docs/method.md, "Tuned grids"):

1. Candidates: a fine grid of times from t = 1 to t_end (the union of `fine` steps uniform in t and
   `fine` steps uniform in log-SNR) plus every fixed grid of `schedule.GRIDS` at the run's number
   of steps, so that the programme can always return a fixed grid when nothing beats it.
2. Teacher: `n` seeded noises carried through every candidate time by `dpm_solver_2` (one step per
   candidate interval, 2 NFE), float32 network; at each candidate state the network's eps and, when
   the model has one, its head's d eps/d gamma (one more NFE per candidate). With AFS the first
   state's eps is the noise itself and its derivative 0, as in `sample`.
3. Cost of a jump i -> j: the RMS error, in x (not x_bar = x sqrt(1 + gamma^2)), of one step from
   the teacher's state at t_i to t_j against the teacher's state at t_j; the step is the
   second-order Taylor step of GENIE in gamma (x_bar += h eps + h^2 / 2 d eps/d gamma) when the
   model has a head, else the DDIM step. Measuring in x matters: an error made at high noise is
   mostly noise-like and the ODE contracts it by about gamma_end / gamma on the way down, which x
   (= x_bar / sqrt(1 + gamma^2)) accounts for and x_bar (EDM's sigma space) does not: a cost in
   x_bar spends the few steps of a short run on the first, irrelevant part of the trajectory.
4. The programme: the path of exactly `steps` jumps from t = 1 to t_end with the least total cost.

The returned grid is a float64 tensor of `steps + 1` decreasing times with attribute ``afs`` (the
AFS setting it was tuned with), which `sample` / `encode` / `SamplingEngine` use when their afs is
None. The cost is a proxy of the final error: check a tuned grid on held-out noise
(`bench/bench_tuned_grids.py`) before trusting it.
"""
from __future__ import annotations

import math
import time

import torch

from .checks import check_int
from .guidance import conditioned
from .ops import head_combine_ref
from .schedule import GRIDS, time_grid

__all__ = ["tune_grid", "shortest_path", "METHODS"]

METHODS = ("search", "dp")


def _candidates(schedule, steps: int, fine: int) -> torch.Tensor:
    """Decreasing float64 times from 1 to t_end: fine uniform-in-t and log-SNR grids and every fixed
    grid at `steps` steps, merged (times closer than 1e-9 are one)."""
    ts = torch.cat([time_grid(schedule, fine, "uniform"), time_grid(schedule, fine, "logsnr")]
                   + [time_grid(schedule, steps, g) for g in GRIDS])
    ts = torch.sort(ts, descending=True).values
    keep = torch.ones_like(ts, dtype=torch.bool)
    keep[1:] = (ts[:-1] - ts[1:]) > 1e-9
    return ts[keep]


def _teacher(model, noise, ts, labels, guidance_scale, progress):
    """x at every time of ts (float32, (len(ts), *noise.shape)): dpm_solver_2, one step per interval."""
    from .sampling import sample

    xs = [noise.float()]
    x, t0 = noise, time.time()
    for k in range(len(ts) - 1):
        x, _ = sample(model, noise=x, solver="dpm_solver_2", grid=[float(ts[k]), float(ts[k + 1])], afs=False,
                      labels=labels, guidance_scale=guidance_scale)
        xs.append(x.float())
        if progress and (k + 1) % 10 == 0:
            print(f"tune_grid: teacher {k + 1}/{len(ts) - 1} intervals ({time.time() - t0:.0f} s)", flush=True)
    return torch.stack(xs)


@torch.no_grad()
def _derivatives(model, xs, ts, labels, guidance_scale, afs, use_head):
    """(eps, d eps / d gamma or None) at every teacher state; with AFS the first is (x_T, 0)."""
    from .solvers.taylor import _genie_eval

    fn = conditioned(model, labels, guidance_scale, batch=xs.shape[1])
    schedule = model.schedule
    evaluate, kind = _genie_eval(fn, None, "tune_grid") if use_head else (None, None)
    eps, deps = [], []
    for k, t in enumerate(ts.tolist()):
        x = xs[k]
        if k == 0 and afs:
            eps.append(x.clone())
            deps.append(torch.zeros_like(x) if use_head else None)
            continue
        tt = torch.full((x.shape[0],), float(schedule.model_time(t)), dtype=torch.float32)
        if use_head:
            e, out = evaluate(x, tt)
            if kind == "raw_head":
                out = head_combine_ref(out.float(), torch.tensor(float(schedule.gamma(t))))
            eps.append(e.float())
            deps.append(out.float())
        else:
            eps.append(fn(x, tt).float())
            deps.append(None)
    return eps, deps


def _costs(xs, eps, deps, gammas) -> torch.Tensor:
    """c[i, j] (i < j): RMS error in x of one step from the teacher state i to time j (inf elsewhere)."""
    m = len(gammas)
    c = torch.full((m, m), math.inf, dtype=torch.float64)
    scale = torch.tensor([math.sqrt(1.0 + g * g) for g in gammas], dtype=torch.float64)
    for i in range(m - 1):
        xbar = xs[i].double() * scale[i]
        for j in range(i + 1, m):
            h = gammas[j] - gammas[i]
            pred = xbar + h * eps[i].double()
            if deps[i] is not None:
                pred = pred + 0.5 * h * h * deps[i].double()
            c[i, j] = float((pred / scale[j] - xs[j].double()).pow(2).mean().sqrt())
    return c


def shortest_path(cost: torch.Tensor, steps: int) -> list[int]:
    """Indices 0 = i_0 < i_1 < ... < i_steps = m - 1 minimising sum_k cost[i_k, i_{k+1}] (m = len(cost))."""
    m = cost.shape[0]
    check_int("steps", steps, 1)
    if steps > m - 1:
        raise ValueError(f"steps={steps} needs at least {steps + 1} candidate times, got {m}")
    best = torch.full((steps + 1, m), math.inf, dtype=torch.float64)
    arg = torch.zeros((steps + 1, m), dtype=torch.long)
    best[0, 0] = 0.0
    for k in range(1, steps + 1):
        tot = best[k - 1][:, None] + cost  # tot[i, j]: reach i in k - 1 jumps, then jump i -> j
        best[k], arg[k] = tot.min(dim=0)
    if not math.isfinite(float(best[steps, m - 1])):
        raise ValueError(f"no path of {steps} finite-cost jumps through {m} candidates")
    path = [m - 1]
    for k in range(steps, 0, -1):
        path.append(int(arg[k, path[-1]]))
    return path[::-1]


def _end_error(model, noise, target, solver, grid, afs, labels, guidance_scale) -> float:
    """Median over samples of the per-sample RMS error of `solver` on `grid` against the teacher's end."""
    from .sampling import sample

    x, _ = sample(model, noise=noise, solver=solver, grid=grid, afs=afs, labels=labels,
                  guidance_scale=guidance_scale)
    return float((x.float() - target).pow(2).flatten(1).mean(1).sqrt().median())


def _search(score, lam: list[float], max_evals: int, progress) -> tuple[list[float], float, int]:
    """Coordinate descent on the interior log-SNR values lam[1:-1] (the ends stay), each move a step
    of a quarter of the gap to the neighbour it moves towards, halved after a sweep without gain."""
    best, evals, frac = score(lam), 1, 0.25
    while evals < max_evals and frac > 1e-3:
        improved = False
        for k in range(1, len(lam) - 1):
            for side in (-1, 1):
                if evals >= max_evals:
                    break
                trial = list(lam)
                trial[k] = lam[k] + frac * (lam[k + side] - lam[k])
                e = score(trial)
                evals += 1
                if e < best:
                    best, lam, improved = e, trial, True
        if progress:
            print(f"tune_grid: search {evals} runs, error {best:.4g}, move {frac:.3g} of a gap", flush=True)
        if not improved:
            frac /= 2
    return lam, best, evals


def tune_grid(model=None, solver=None, nfe=None, steps=None, *, n=128, seed=0, labels=None, guidance_scale=None,
              afs=None, method="search", fine=32, max_evals=60, progress=True):
    """A grid of times tuned for `solver` at this budget on `model` (default: the bundled model).

    nfe / steps / afs: as for `sample` (AFS on by default; the budget counts it as `sample` does).
    n noises of `seed` make the teacher; labels / guidance_scale: the conditioning the grid is for
    (labels: as `sample` takes them for a batch of n). fine: steps of each fine candidate grid.
    Returns a decreasing float64 tensor of steps + 1 times whose attribute ``afs`` records AFS.
    """
    from .sampling import _default_model
    from .solvers import HEAD_SOLVERS, evals_per_call, resolve

    if method not in METHODS:
        raise ValueError(f"tune_grid method must be one of {METHODS}, got {method!r}")
    check_int("n", n, 1)
    check_int("seed", seed, 0)
    check_int("fine", fine, 2)
    model = _default_model() if model is None else model
    # a guided step costs 2 NFE: the budget counts it as sample() does for the same labels and scale
    opts = resolve(solver, nfe, steps, "auto", afs,
                   evals_per_call=evals_per_call(conditioned(model, labels, guidance_scale, batch=n)))
    schedule = model.schedule
    use_head = callable(getattr(model, "eps_and_head", None)) or callable(getattr(model, "eps_and_deps", None))
    if opts.solver in HEAD_SOLVERS and not use_head:
        raise TypeError(f"{opts.solver} needs a model with a head (eps_and_head / eps_and_deps)")
    shape = getattr(model, "image_shape", None)
    if shape is None:
        raise ValueError("tune_grid needs model.image_shape (the shape of one sample)")
    t0 = time.time()
    ts = _candidates(schedule, opts.steps, fine)
    noise = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))
    if progress:
        print(f"tune_grid: {opts.solver}, {opts.steps} steps (afs={opts.afs}), {len(ts)} candidate times, "
              f"{n} noises", flush=True)
    xs = _teacher(model, noise, ts, labels, guidance_scale, progress)
    eps, deps = _derivatives(model, xs, ts, labels, guidance_scale, opts.afs, use_head)
    gammas = [float(schedule.gamma(t)) for t in ts.tolist()]
    cost = _costs(xs, eps, deps, gammas)
    path = shortest_path(cost, opts.steps)
    grid = ts[path].clone()
    if method == "search":  # start from the best of the programme's grid and the fixed ones, by the end error
        def times_of(lam_list):  # interior points from their log-SNR; the ends stay exactly 1 and t_end
            times = schedule.t_of_log_snr(torch.tensor(lam_list, dtype=torch.float64))
            times[0], times[-1] = ts[0], ts[-1]
            return times

        def score(lam_list):
            return _end_error(model, noise, xs[-1], opts.solver, times_of(lam_list), opts.afs, labels, guidance_scale)

        starts = [grid] + [time_grid(schedule, opts.steps, g) for g in GRIDS]
        errs = [_end_error(model, noise, xs[-1], opts.solver, g, opts.afs, labels, guidance_scale) for g in starts]
        start = starts[min(range(len(starts)), key=errs.__getitem__)]
        if progress:
            print("tune_grid: start errors " + ", ".join(f"{name} {e:.4g}" for name, e in zip(("dp", *GRIDS), errs)),
                  flush=True)
        lam, _, _ = _search(score, schedule.log_snr(start).tolist(), max_evals, progress)
        grid = times_of(lam)
    grid.afs = opts.afs
    if progress:
        print(f"tune_grid: done in {time.time() - t0:.0f} s; proxy cost {float(sum(cost[a, b] for a, b in zip(path, path[1:]))):.4g}; "
              f"times {[round(float(t), 4) for t in grid]}", flush=True)
    return grid
