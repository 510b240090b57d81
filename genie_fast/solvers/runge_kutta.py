"""Runge-Kutta solvers in gamma: Heun and DPM-Solver-2, 2 NFE per step."""
from __future__ import annotations

import torch

from .. import ops
from .loop import _StepLoop


def heun(model, x, ts, schedule, *, afs=False, denoise=False, backend="auto", net_dtype=None, plan=None):
    """Heun's method in gamma (Karras et al. 2022, Alg. 1, on the DDIM ODE). 2 NFE per step.

    x_bar' = x_bar_n + h eps_n;  x_bar_{n+1} = x_bar_n + h (eps_n + eps(x', t_{n+1})) / 2.
    """
    run = _StepLoop(model, x, ts, schedule, afs, denoise, backend, net_dtype, plan)
    x_bar, x_n = run.x_bar, x
    for n in run.steps():
        row = run.rows[n]
        eps = run.eps(x_n, n)
        # x_bar' = x_bar_n + h eps_n;  x_bar_{n+1} = x_bar_n + h (eps_n + eps(x', t_{n+1})) / 2
        _, x_pred = ops.ddim_step(x_bar, eps, row, backend=backend)
        eps_pred = run.eps(x_pred, n + 1)
        x_bar, x_n = ops.ddim_step(x_bar, 0.5 * (eps + eps_pred), row, backend=backend)
    return run.finish(x_bar, x_n)


def dpm_solver_2(model, x, ts, schedule, *, afs=False, denoise=False, backend="auto", net_dtype=None, plan=None):
    """DPM-Solver-2 (Lu et al. 2022, Alg. 1, r1 = 1/2), singlestep, noise prediction. 2 NFE/step.

    In x_bar it is the midpoint rule in gamma with the midpoint at half logSNR,
    gamma_mid = sqrt(gamma_n gamma_{n+1}):
    u_bar = x_bar_n + (gamma_mid - gamma_n) eps_n;  x_bar_{n+1} = x_bar_n + h eps(u, t_mid).
    """
    run = _StepLoop(model, x, ts, schedule, afs, denoise, backend, net_dtype, plan)
    g, t = run.plan.gammas, run.plan.ts

    def t_mid():
        return schedule.t_of_gamma(torch.sqrt(g[:-1] * g[1:]))

    # rows of the half steps t_n -> t_mid_n: the even rows of the interleaved grid
    half = run.plan.table("dpm2_interleaved", lambda: torch.cat([torch.stack([t[:-1], t_mid()], 1).flatten(),
                                                                 t[-1:]]))
    t_mid_net = run.plan.times("dpm2_t_mid", t_mid)
    x_bar, x_n = run.x_bar, x
    for n in run.steps():
        eps = run.eps(x_n, n)
        # u_bar = x_bar_n + (gamma_mid - gamma_n) eps_n;  x_bar_{n+1} = x_bar_n + h eps(u, t_mid)
        _, u = ops.ddim_step(x_bar, eps, half[2 * n], backend=backend)
        eps_mid = run.call(model, u, t_mid_net[n])
        x_bar, x_n = ops.ddim_step(x_bar, eps_mid, run.rows[n], backend=backend)
    return run.finish(x_bar, x_n)
