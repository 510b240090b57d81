"""A float64 reference solution of the probability-flow ODE, to measure solvers against.

Classical Runge-Kutta 4 on d x_bar / du = gamma eps(x, t) with u = log gamma (uniform steps in
half-logSNR, where the ODE is smooth from t = 1 down to t_end). The step count doubles until two
successive solutions agree: for a fourth-order method the error of the finer one is about
|x_2N - x_N| / 15 (Richardson), and that estimate must fall below `tol`.

Glossary: "reference" means four things in this project. Here: the RK4 reference solution of the
ODE (the truth solvers are measured against). In `genie_fast.ops`: the ``*_ref`` PyTorch ops (the
plain-PyTorch definition each fused backend must match). In `solvers.dpmpp_3m`: the variant
"reference", the authors' released code. In tests: the expected values a result is compared with.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["ReferenceSolution", "reference_solution", "rk4_solve"]


class ReferenceSolution(NamedTuple):
    x: torch.Tensor   # the network input at t_end, float64, (B, C, ...)
    err: float        # estimated max abs error of x (Richardson, |x_2N - x_N| / 15)
    steps: int        # RK4 steps of the returned solution


def rk4_solve(model, x: torch.Tensor, schedule, t_start: float, t_end: float, steps: int) -> torch.Tensor:
    """`steps` RK4 steps uniform in log gamma from t_start to t_end; 4 evaluations per step."""
    x = x.to(torch.float64)
    batch, view = x.shape[0], (-1, *([1] * (x.dim() - 1)))
    u0, u1 = math.log(schedule.gamma(float(t_start))), math.log(schedule.gamma(float(t_end)))
    du = (u1 - u0) / steps

    def f(x_bar, u):
        gamma = math.exp(u)
        t = torch.full((batch,), schedule.t_of_gamma(gamma), dtype=torch.float64, device=x.device)
        x_in = x_bar / math.sqrt(1.0 + gamma * gamma)
        return gamma * model(x_in, schedule.model_time(t)).to(torch.float64)

    x_bar = x * math.sqrt(1.0 + math.exp(2 * u0))
    for i in range(steps):
        u = u0 + i * du
        k1 = f(x_bar, u)
        k2 = f(x_bar + 0.5 * du * k1, u + 0.5 * du)
        k3 = f(x_bar + 0.5 * du * k2, u + 0.5 * du)
        k4 = f(x_bar + du * k3, u + du)
        x_bar = x_bar + du / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    return (x_bar / math.sqrt(1.0 + math.exp(2 * u1))).view(x.shape)


@torch.no_grad()
def reference_solution(model, x: torch.Tensor, schedule=None, t_start: float = 1.0, t_end: float | None = None,
                       tol: float = 1e-9, steps: int = 128, max_steps: int = 1 << 15) -> ReferenceSolution:
    """Solve from x at t_start to t_end in float64 until the Richardson estimate is below tol.

    Raises RuntimeError if max_steps is reached first (e.g. a model that is not smooth in t).
    """
    schedule = schedule if schedule is not None else getattr(model, "schedule", None)
    if schedule is None:
        raise ValueError("pass a schedule (the model has no .schedule attribute)")
    t_end = schedule.t_end if t_end is None else float(t_end)
    if not 0.0 < t_end < t_start <= 1.0:
        raise ValueError(f"need 0 < t_end < t_start <= 1, got t_end={t_end}, t_start={t_start}")
    if steps < 1 or 2 * steps > max_steps:
        raise ValueError(f"need 1 <= steps and 2 * steps <= max_steps, got {steps}, {max_steps}")
    coarse = rk4_solve(model, x, schedule, t_start, t_end, steps)
    while 2 * steps <= max_steps:
        steps *= 2
        fine = rk4_solve(model, x, schedule, t_start, t_end, steps)
        err = float((fine - coarse).abs().max()) / 15.0
        if err <= tol:
            return ReferenceSolution(fine, err, steps)
        coarse = fine
    raise RuntimeError(f"reference ODE solution did not reach tol={tol} within {max_steps} RK4 steps "
                       f"(last estimate {err:.3g})")
