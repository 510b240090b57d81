"""NFE accounting: what a step, a JVP and a model call cost in network evaluations per sample."""
from __future__ import annotations

# A forward-mode JVP through the network counts as this many network evaluations: its cost against
# one forward of the bundled model on the CPU, measured by bench/bench_overhead.py (the ratios are
# in bench/RESULTS.md, "Sampling engine").
JVP_NFE = 4

# The registry: name -> solver function, and its network evaluations per step (genie_exact: eps (1)
# + its JVP (JVP_NFE)). Both are filled once, by genie_fast/solvers/__init__.py, when every solver
# is defined; this module only reads them.
SOLVERS: dict = {}
NFE_PER_STEP: dict = {}


def evals_per_call(model) -> int:
    """Network evaluations one call of `model` costs per sample (its ``evals_per_call``, default 1)."""
    k = getattr(model, "evals_per_call", 1)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"evals_per_call must be a positive int, got {k!r}")
    return k


def _check_solver(solver: str):
    if not isinstance(solver, str):
        raise TypeError(f"solver must be a solver's name (a str, one of {sorted(SOLVERS)}), got {solver!r} "
                        f"({type(solver).__name__})")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")


def nfe_of(solver: str, steps: int, afs: bool = False, denoise: bool = False, evals_per_call: int = 1) -> int:
    """Network evaluations per sample that `solver` spends on `steps` steps (what it returns as nfe).

    AFS saves the evaluation at t = 1 (genie_exact: its whole first step, JVP included); denoising
    adds one; a model with ``evals_per_call = k`` multiplies everything by k.
    """
    _check_solver(solver)
    per_step = NFE_PER_STEP[solver]
    afs_saving = per_step if solver == "genie_exact" else 1
    return (steps * per_step - (afs_saving if afs else 0) + (1 if denoise else 0)) * evals_per_call


def steps_for_nfe(solver: str, nfe: int, afs: bool = False, denoise: bool = False, evals_per_call: int = 1) -> int:
    """The most steps whose cost fits the NFE budget (0 when not even one step fits).

    A budget that does not divide is rounded down: e.g. heun with nfe=9 takes 4 steps, 8 NFE.
    """
    _check_solver(solver)
    steps = 0
    while nfe_of(solver, steps + 1, afs, denoise, evals_per_call) <= nfe:
        steps += 1
    return steps
