"""Learned time grids: `tune_grid` picks the times of a few-step run by dynamic programming over a
fine teacher trajectory of the same network (GITS-style, arXiv 2405.11326), with a cost of our own.

    ts = genie_fast.tune_grid(solver="genie_multistep", nfe=5)      # bundled model, null class
    x0, nfe = genie_fast.sample(n=64, solver="genie_multistep", nfe=5, grid=ts)

The method (docs/method.md, "Tuned grids"):

1. Candidates: a fine grid of times from t = 1 to t_end (the union of `fine` steps uniform in t and
   `fine` steps uniform in log-SNR) plus every fixed grid of `schedule.GRIDS` at the run's number
   of steps, so that the programme can always return a fixed grid when nothing beats it.
2. Teacher: `n` seeded noises carried through the fine times by `dpm_solver_2` (one step per
   interval, 2 NFE) and from the nearest fine time above to each fixed grid's time, float32 network
   (kept for the next call on the same model, noise and conditioning); at each candidate state the
   network's eps and, when the model has one, its head's d eps/d gamma (one more NFE per candidate). With AFS the first
   state's eps is the noise itself and its derivative 0, as in `sample`.
3. Cost of a jump i -> j: the RMS error, in x (not x_bar = x sqrt(1 + gamma^2)), of one step from
   the teacher's state at t_i to t_j against the teacher's state at t_j; the step is the
   second-order Taylor step of GENIE in gamma (x_bar += h eps + h^2 / 2 d eps/d gamma) when the
   model has a head, else the DDIM step. Measuring in x matters: an error made at high noise is
   mostly noise-like and the ODE contracts it by about gamma_end / gamma on the way down, which x
   (= x_bar / sqrt(1 + gamma^2)) accounts for and x_bar (EDM's sigma space) does not: a cost in
   x_bar spends the few steps of a short run on the first, irrelevant part of the trajectory.
4. The programme: the path of exactly `steps` jumps from t = 1 to t_end with the least total cost.
5. The check: the solver itself runs the programme's grid and every fixed grid on the tuning noise; the
   one with the least median end error (against the teacher's end) is kept (method="dp"), or is the
   start of a coordinate search in log-SNR on that same end error (method="search", the default).

The returned grid is a float64 tensor of `steps + 1` decreasing times with attribute ``afs`` (the
AFS setting it was tuned with), which `sample` / `encode` / `SamplingEngine` use when their afs is
None, and ``info`` (how it was tuned, its end errors): `grid_store.save_tuned_grid` stores both beside
the model, where ``grid="tuned"`` and ``grid="auto"`` find them (``genie-fast tune-grid`` does both). The cost is a proxy of the final error: check a tuned grid on held-out noise
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


def _fine(schedule, fine: int) -> torch.Tensor:
    """The fine candidate times: `fine` steps uniform in t and `fine` uniform in log-SNR, merged."""
    return _merge(torch.cat([time_grid(schedule, fine, "uniform"), time_grid(schedule, fine, "logsnr")]))


def _merge(ts: torch.Tensor) -> torch.Tensor:
    """Decreasing unique times (times closer than 1e-9 are one)."""
    ts = torch.sort(ts, descending=True).values
    keep = torch.ones_like(ts, dtype=torch.bool)
    keep[1:] = (ts[:-1] - ts[1:]) > 1e-9
    return ts[keep]


def _candidates(schedule, steps: int, fine: int) -> torch.Tensor:
    """Decreasing float64 times from 1 to t_end: the fine times and every fixed grid at `steps` steps."""
    return _merge(torch.cat([_fine(schedule, fine)] + [time_grid(schedule, steps, g) for g in GRIDS]))


class _Teacher:
    """The teacher of one (model, noise, conditioning, fine grid): states and derivatives by time, kept
    between `tune_grid` calls of a process (the keys of one model share it). Canonical, whatever the
    order of the calls: the states at the fine times are one chain of `dpm_solver_2` steps (one per
    interval, 2 NFE); a state at another time is one step from the nearest fine time above it."""

    def __init__(self, model, noise, fine_ts, labels, guidance_scale):
        self.model, self.noise, self.labels, self.scale = model, noise, labels, guidance_scale
        self.fine = fine_ts.tolist()
        self.states: dict[float, torch.Tensor] = {}
        self.derivs: dict[float, tuple] = {}

    def _step(self, x, t0, t1):
        from .sampling import sample

        x, _ = sample(self.model, noise=x, solver="dpm_solver_2", grid=[t0, t1], afs=False, labels=self.labels,
                      guidance_scale=self.scale)
        return x.float()

    def states_at(self, ts: list[float], progress) -> torch.Tensor:
        """x at every time of ts (float32, (len(ts), *noise.shape))."""
        t0 = time.time()
        if not self.states:
            x = self.states[self.fine[0]] = self.noise.float()
            for k in range(len(self.fine) - 1):
                x = self.states[self.fine[k + 1]] = self._step(x, self.fine[k], self.fine[k + 1])
                if progress and (k + 1) % 10 == 0:
                    print(f"tune_grid: teacher {k + 1}/{len(self.fine) - 1} intervals ({time.time() - t0:.0f} s)",
                          flush=True)
        for t in ts:
            if t not in self.states:
                above = min(f for f in self.fine if f > t)
                self.states[t] = self._step(self.states[above], above, t)
        return torch.stack([self.states[t] for t in ts])

    @torch.no_grad()
    def derivatives(self, xs, ts: list[float], afs: bool, use_head: bool):
        """(eps, d eps / d gamma or None) at every state; with AFS the first is (x_T, 0)."""
        from .solvers.taylor import _genie_eval

        fn = conditioned(self.model, self.labels, self.scale, batch=xs.shape[1])
        schedule = self.model.schedule
        evaluate, kind = _genie_eval(fn, None, "tune_grid") if use_head else (None, None)
        eps, deps = [], []
        for k, t in enumerate(ts):
            x = xs[k]
            if k == 0 and afs:
                eps.append(x.clone())
                deps.append(torch.zeros_like(x) if use_head else None)
                continue
            if (t, use_head) not in self.derivs:
                tt = torch.full((x.shape[0],), float(schedule.model_time(t)), dtype=torch.float32)
                if use_head:
                    e, out = evaluate(x, tt)
                    if kind == "raw_head":
                        out = head_combine_ref(out.float(), torch.tensor(float(schedule.gamma(t))))
                    self.derivs[(t, use_head)] = (e.float(), out.float())
                else:
                    self.derivs[(t, use_head)] = (fn(x, tt).float(), None)
            e, d = self.derivs[(t, use_head)]
            eps.append(e)
            deps.append(d)
        return eps, deps


_TEACHERS: list = []  # the last teacher: (key, _Teacher)


def _teacher_for(model, noise, fine_ts, labels, guidance_scale, seed) -> _Teacher:
    lab = None if labels is None else torch.as_tensor(labels).flatten().tolist()
    key = (tuple(noise.shape), seed, lab, guidance_scale, tuple(fine_ts.tolist()))
    if _TEACHERS and _TEACHERS[0][0] == key and _TEACHERS[0][1].model is model:
        return _TEACHERS[0][1]
    _TEACHERS.clear()
    _TEACHERS.append((key, _Teacher(model, noise, fine_ts, labels, guidance_scale)))
    return _TEACHERS[0][1]


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
    method: "search" (the DP's or a fixed grid, whichever ends closer to the teacher, refined by
    coordinate search; about `max_evals` more runs of the solver) or "dp" (no search).
    Returns a decreasing float64 tensor of steps + 1 times whose attribute ``afs`` records AFS and
    ``info`` how it was tuned (for `grid_store.save_tuned_grid`).
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
    teacher = _teacher_for(model, noise, _fine(schedule, fine), labels, guidance_scale, seed)
    xs = teacher.states_at(ts.tolist(), progress)
    eps, deps = teacher.derivatives(xs, ts.tolist(), opts.afs, use_head)
    gammas = [float(schedule.gamma(t)) for t in ts.tolist()]
    cost = _costs(xs, eps, deps, gammas)
    path = shortest_path(cost, opts.steps)
    grid = ts[path].clone()
    # the programme's grid against the fixed ones by the solver's own end error on the tuning noise: a
    # stored grid must never be worse there than the fixed grid it replaces (the cost is only a proxy)
    starts = {"dp": grid, **{g: time_grid(schedule, opts.steps, g) for g in GRIDS}}
    errors = {name: _end_error(model, noise, xs[-1], opts.solver, g, opts.afs, labels, guidance_scale)
              for name, g in starts.items()}
    best = min(errors, key=errors.__getitem__)
    grid, end = starts[best], errors[best]
    if progress:
        print("tune_grid: end errors " + ", ".join(f"{name} {e:.4g}" for name, e in errors.items()), flush=True)
    if method == "search":  # coordinate descent from the best of them, on the same end error
        def times_of(lam_list):  # interior points from their log-SNR; the ends stay exactly 1 and t_end
            times = schedule.t_of_log_snr(torch.tensor(lam_list, dtype=torch.float64))
            times[0], times[-1] = ts[0], ts[-1]
            return times

        def score(lam_list):
            return _end_error(model, noise, xs[-1], opts.solver, times_of(lam_list), opts.afs, labels, guidance_scale)

        lam, end, _ = _search(score, schedule.log_snr(grid).tolist(), max_evals, progress)
        grid = times_of(lam)
    grid.afs = opts.afs
    seconds = time.time() - t0
    grid.info = {"tuned": {"method": method, "n": n, "seed": seed, "fine": fine, "teacher": "dpm_solver_2",
                           "max_evals": max_evals if method == "search" else None, "start": best,
                           "proxy_cost": float(sum(cost[a, b] for a, b in zip(path, path[1:]))),
                           "seconds": round(seconds, 1)},
                 "error": {"tuned": end, **{f"{k}": v for k, v in errors.items()}}}
    if progress:
        print(f"tune_grid: done in {seconds:.0f} s; end error {end:.4g} (from {best} {errors[best]:.4g}); "
              f"times {[round(float(t), 4) for t in grid]}", flush=True)
    return grid
