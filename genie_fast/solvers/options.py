"""The default sampling options, the per-solver choices behind grid="auto" / afs=None, and `resolve`:
one place that turns a user's options into the values a run uses."""
from __future__ import annotations

import inspect
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from ..checks import check_flag, check_int
from ..schedule import GRIDS, time_grid
from .accounting import SOLVERS, _check_solver, nfe_of, steps_for_nfe

# genie_multistep: GENIE's distilled head in a multistep integrator; on the bundled model (null class)
# its median ODE error is 1.15x / 2.5x / 2.9x below genie's at NFE 5 / 10 / 15 (bench/bench_grids.py,
# bench/RESULTS.md; guided, s = 2: 1.6x worse at NFE 5, 1.1x / 1.8x better at 10 / 15)
DEFAULT_SOLVER = "genie_multistep"
DEFAULT_NFE = 10
# AFS saves the network evaluation at t = 1 for one more step: better or equal for every solver at
# 5 and 10 NFE on the bundled model (bench/bench_grids.py, bench/RESULTS.md), so it is on by default.
DEFAULT_AFS = True
# grid="auto": per solver, the grid with the lowest geometric mean of the median per-sample ODE error
# on the bundled model at NFE 5, 10 and 15, null class and guided (s = 2), with AFS
# (`python bench/bench_grids.py --choose bench/results/grids_cond6/null.json .../guided.json`; the
# tables are in docs/guide.md and bench/RESULTS.md). genie_exact: measured on the model before it.
AUTO_GRID = {
    "ddim": "uniform",
    "genie": "uniform",
    "genie_exact": "edm",
    "heun": "edm",
    "dpm_solver_2": "edm",
    "dpmpp_2m": "logsnr",
    "dpmpp_3m": "quadratic",
    "unipc": "logsnr",
    "ipndm": "uniform",
    "genie_multistep": "quadratic",
}
# afs=None with a named grid: the solver's entry. Every solver has the same one, DEFAULT_AFS (no solver
# measured better without AFS); the table is kept so that a caller can look a solver up. afs=None with
# an explicit grid of times is off (`resolve`): the given times then define every network call.
AUTO_AFS = dict.fromkeys(AUTO_GRID, DEFAULT_AFS)


def grid_for(solver: str, grid="auto"):
    """The grid `grid="auto"` means for `solver` (`AUTO_GRID`; "logsnr" for a solver added later
    without an entry); any other grid is returned as is."""
    _check_solver(solver)
    return AUTO_GRID.get(solver, "logsnr") if isinstance(grid, str) and grid == "auto" else grid


def check_grid_arg(grid):
    """`grid` as a run takes it: None or a name (a str, checked later against GRIDS), or the times as
    a 1-D sequence, tensor or numpy array of numbers (a numpy array comes back as a tensor); anything
    else (a number, a nested list, a dict, ...) is a TypeError naming grid. Values are checked by
    `resolve` (`schedule.time_grid`)."""
    if grid is None or isinstance(grid, str):
        return grid
    if isinstance(grid, np.ndarray):
        grid = torch.as_tensor(grid)
    if isinstance(grid, torch.Tensor):
        if grid.dim() != 1 or grid.dtype == torch.bool or grid.is_complex():
            raise TypeError(f"grid must be a name of {GRIDS} or \"auto\", or a 1-D sequence of times, got "
                            f"{grid.dtype} values of shape {tuple(grid.shape)}")
        return grid
    if isinstance(grid, bytes) or not isinstance(grid, Sequence):
        raise TypeError(f"grid must be a name of {GRIDS} or \"auto\", or a 1-D sequence of times, got "
                        f"{grid!r} ({type(grid).__name__})")
    for i, t in enumerate(grid):
        if isinstance(t, bool) or not isinstance(t, (numbers.Real, np.floating, np.integer)) \
                and not (isinstance(t, torch.Tensor) and t.dim() == 0):
            nested = (" (a nested sequence: give one flat list of times)"
                      if isinstance(t, (Sequence, np.ndarray, torch.Tensor)) and not isinstance(t, str) else "")
            raise TypeError(f"grid must be a 1-D sequence of times (numbers), got {t!r} ({type(t).__name__}) at "
                            f"index {i}{nested}")
    return grid


_COMMON = ("model", "x", "ts", "schedule", "afs", "denoise", "backend", "net_dtype", "plan")


def check_solver_kw(solver: str, solver_kw: dict):
    """Refuse, by name, a solver keyword argument that `solver` does not take (its options, e.g.
    head= for genie, order= for unipc) or that is not hashable (they are part of the graph key)."""
    params = inspect.signature(SOLVERS[solver]).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    own = [n for n, p in params.items() if n not in _COMMON and p.kind is p.KEYWORD_ONLY]
    for name, value in solver_kw.items():
        if not takes_any and (name not in params or name in _COMMON):
            raise TypeError(f"solver {solver!r} takes no keyword argument {name!r}; its options: "
                            f"{', '.join(own) or 'none'}")
        try:
            hash(value)
        except TypeError:
            raise TypeError(f"solver keyword argument {name}={value!r} must be hashable (solver keyword "
                            "arguments are part of the graph key: a tuple, not a list)") from None


class Options(NamedTuple):
    """Sampling options as a run uses them (`resolve`)."""
    solver: str
    grid: object        # a grid name ("auto" resolved), or the checked float64 times of a given grid
    steps: int          # the number of steps
    nfe: int | None     # the budget: as given, DEFAULT_NFE for a named grid without nfe or steps, else None
    spent: int          # network evaluations per sample the run spends (`nfe_of`)
    afs: bool
    denoise: bool


def resolve(solver=None, nfe=None, steps=None, grid="auto", afs=None, denoise=False, *,
            evals_per_call: int = 1, encode: bool = False) -> Options:
    """A user's sampling options with every default and per-solver choice filled in, checked.

    solver: a name of SOLVERS (None: DEFAULT_SOLVER). nfe / steps: a budget of network evaluations
    (the most steps that fit are taken, `steps_for_nfe`) or the number of steps, not both; neither:
    the budget DEFAULT_NFE. grid: a name of `schedule.GRIDS`, "auto" or None (`grid_for`), or the
    times themselves (checked by `time_grid`; steps and nfe, when given, must agree with them).
    afs: True, False or None: with a named grid (or "auto") the solver's `AUTO_AFS` entry (on); with
    a grid from `tune_grid` (a tensor whose ``afs`` attribute is a bool) the AFS it was tuned with; with
    any other explicit grid of times off, since the given times then say where the network is called (a
    diffusers scheduler's timesteps call it at the first one: AFS would replace that call by x_T);
    afs=True still applies AFS to a given grid. denoise: True or False. evals_per_call: the model's
    (`evals_per_call`), which multiplies every NFE count. encode: the options of an encoding run
    (AFS and denoising refused; a given grid may run either way), else a sampling run (a given
    grid must decrease). Raises what `SamplingEngine` raises for the same options.
    """
    for name, value in (("nfe", nfe), ("steps", steps)):  # the checks in SamplingEngine's order
        if value is not None:
            check_int(name, value, 1)
    afs, denoise = check_flag("afs", afs, allow_none=True), check_flag("denoise", denoise)
    solver = DEFAULT_SOLVER if solver is None else solver
    _check_solver(solver)
    grid = check_grid_arg(grid)
    if encode:
        if afs or denoise:
            raise ValueError("encoding runs from data to noise: AFS and the denoising step do not apply")
        afs = False
        if not isinstance(grid, str) and isinstance(grid, (Sequence, torch.Tensor)):
            grid = time_grid(None, None, grid)
    elif afs is None:  # an explicit grid of times: no AFS unless asked for, or tuned with it (`tune_grid`)
        tuned = getattr(grid, "afs", None) if isinstance(grid, torch.Tensor) else None
        afs = (AUTO_AFS.get(solver, DEFAULT_AFS) if grid is None or isinstance(grid, str)
               else tuned if isinstance(tuned, bool) else False)
    if nfe is not None and steps is not None:
        raise ValueError(f"give nfe= or steps=, not both (got nfe={nfe}, steps={steps})")
    grid = grid_for(solver, "auto" if grid is None else grid)
    if isinstance(grid, str):
        if steps is None:
            nfe = DEFAULT_NFE if nfe is None else nfe
            steps = steps_for_nfe(solver, nfe, afs, denoise, evals_per_call)
            if steps < 1 or nfe_of(solver, steps, afs, denoise, evals_per_call) < 1:  # (one AFS step calls nothing)
                raise ValueError(f"nfe={nfe} is too small for {solver} (afs={afs}, denoise={denoise}): the "
                                 f"smallest run that calls the network needs "
                                 f"{nfe_of(solver, steps + 1, afs, denoise, evals_per_call)}")
        if grid == "tuned":
            raise ValueError("grid='tuned' is a model's stored grid: the engine (sample, encode, SamplingEngine, "
                             "generate) looks it up; resolve takes a name of GRIDS, 'auto' or the times")
        if grid not in GRIDS:
            raise ValueError(f"unknown time grid {grid!r}; choose one of {GRIDS}, 'auto', 'tuned' (the model's "
                             "tuned grid) or pass the times")
    else:
        if not isinstance(grid, (Sequence, torch.Tensor)):
            raise TypeError(f"grid must be a name or a sequence of times, got {type(grid).__name__}")
        grid = time_grid(None, None, grid)
        if not encode and grid[-1] > grid[0]:
            raise ValueError("sampling runs from noise to data: the grid must decrease strictly (t = 1 -> t_end)")
        if steps is not None and steps != len(grid) - 1:
            raise ValueError(f"steps={steps} disagrees with the given grid of {len(grid) - 1} steps")
        need = nfe_of(solver, len(grid) - 1, afs, denoise, evals_per_call)
        if nfe is not None and need > nfe:
            raise ValueError(f"the given grid of {len(grid) - 1} steps needs {need} NFE with {solver}, "
                             f"over nfe={nfe}")
        steps = len(grid) - 1
    spent = nfe_of(solver, steps, afs, denoise, evals_per_call)
    if spent < 1:
        raise ValueError(f"a grid of {steps} step(s) with afs={afs}, denoise={denoise} "
                         "would call the network zero times")
    return Options(solver, grid, steps, nfe, spent, afs, denoise)
