"""Multistep solvers: DPM-Solver++(2M) and (3M), UniPC and iPNDM, with their per-step weights (computed
on the host once per plan) and the lower_order_final rules of their authors' and diffusers' samplers."""
from __future__ import annotations

import math

import torch

from .. import ops
from ..layout import DPMPP_2M_A, DPMPP_2M_B, DPMPP_2M_WEIGHTS
from .loop import _StepLoop


# lower_order_final: below how many steps each peer lowers the order of the last steps (None: at every
# step count), per solver family. True is what the solver's authors' released sampler does with its
# lower_order_final=True, "diffusers" what the matching diffusers scheduler does (see `dpmpp_3m`, `unipc`).
_LOWER_ORDER_FINAL_BELOW = {
    "dpm": {True: 10, "diffusers": 15},        # DPM-Solver's multistep sampler; DPMSolverMultistepScheduler
    "unipc": {True: None, "diffusers": None},  # UniPC's multistep sampler; UniPCMultistepScheduler
}


def _check_lower_order_final(value):
    if not (isinstance(value, bool) or (isinstance(value, str) and value == "diffusers")):
        raise ValueError("lower_order_final must be False, True (the solver authors' rule) or 'diffusers' "
                         f"(diffusers' scheduler's rule), got {value!r}")


def _lowered(num_steps: int, lower_order_final, family: str) -> bool:
    """Whether `lower_order_final` lowers the last steps of a run of num_steps steps."""
    if lower_order_final is False:
        return False
    below = _LOWER_ORDER_FINAL_BELOW[family][lower_order_final]
    return below is None or num_steps < below


def _step_orders(num_steps: int, order: int, lowered: bool) -> list[int]:
    """The order of each step: min(order, n + 1) (step n has n + 1 data predictions), and when the
    last steps are lowered also at most num_steps - n (the last step first order, the one before at
    most second). Host-side: decided once per call from the step count, never from data."""
    return [min(order, n + 1, num_steps - n if lowered else order) for n in range(num_steps)]


def _dpmpp_2m_weights(plan, lowered: bool) -> list:
    """Per step: [a, b] of x_bar_{n+1} = r x_bar_n + (1 - r) (a x0_n + b x0_{n-1}) (`layout.DPMPP_2M_A`,
    `DPMPP_2M_B`): b = -1 / (2 q), a = 1 - b with the log-SNR step ratio q = h_{n-1} / h_n
    (h_n = log gamma_n - log gamma_{n+1}); a = 1, b = 0 (first order, DDIM) on the first step and,
    when lowered, on the last."""
    g = plan.gammas
    h_lam = torch.log(g[:-1]) - torch.log(g[1:])
    q = torch.ones_like(h_lam)
    q[1:] = h_lam[:-1] / h_lam[1:]
    b = -0.5 / q
    b[0] = 0.0
    if lowered:
        b[-1] = 0.0
    rows = torch.zeros(plan.num_steps, DPMPP_2M_WEIGHTS, dtype=torch.float64)
    rows[:, DPMPP_2M_A], rows[:, DPMPP_2M_B] = 1.0 - b, b
    return rows.tolist()


def dpmpp_2m(model, x, ts, schedule, *, afs=False, denoise=False, backend="auto", net_dtype=None, plan=None,
             lower_order_final=False):
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2), data prediction, 1 NFE per step.

    x_bar_{n+1} = r x_bar_n + (1 - r) (a x0_n + b x0_{n-1}) (r from the coefficient row, the step's
    weights a, b from the log-SNR step sizes: `_dpmpp_2m_weights`, kept in the plan); the first step is
    DDIM (b = 0). This is
    the 'dpmsolver' form of the second-order multistep update (diffusers: solver_type="midpoint"),
    I_0 x0_n + (I_0 / 2) D1_0 with D1_0 = (x0_n - x0_{n-1}) / r0 (see `dpmpp_3m`).
    lower_order_final: False (default, order 2 on every step but the first); True, the DPM-Solver
    authors' rule: with fewer than 10 steps the last step is first order (DDIM, a = 1, b = 0);
    "diffusers", DPMSolverMultistepScheduler's: the same below 15 steps (see `dpmpp_3m` for both
    rules). Off by default: dpmpp_2m's grid (`AUTO_GRID`) was chosen without it (measurements:
    bench/RESULTS.md, issue 15).
    """
    _check_lower_order_final(lower_order_final)
    run = _StepLoop(model, x, ts, schedule, afs, denoise, backend, net_dtype, plan)
    lowered = _lowered(run.num_steps, lower_order_final, "dpm")
    # per-step [a, b], kept in the plan (the lowered last step has a = 1, b = 0: no allocation in the loop)
    weights = run.plan.weights("dpmpp_2m" + ("_lowered" if lowered else ""),
                               lambda: _dpmpp_2m_weights(run.plan, lowered))
    x_bar, x_n = run.x_bar, x
    x0_prev = torch.zeros_like(x_bar)
    for n in run.steps():
        eps = run.eps(x_n, n)
        # x_bar_{n+1} = r x_bar_n + (1 - r) (a x0_n + b x0_{n-1})
        x_bar, x_n, x0_prev = ops.dpmpp_2m_step(x_bar, eps, x0_prev, weights[n], run.rows[n], backend=backend)
    return run.finish(x_bar, x_n)


def _exp_integrals(h: float, order: int) -> list[float]:
    """I_k = e^{-h} int_0^h tau^k / k! e^tau dtau, k = 0..order (h: one step in lambda, either sign).

    They weigh the Taylor terms of x0(lambda) in the exact solution
    x_bar_next = r x_bar + sum_k I_k d^k x0 / d lambda^k  (r = e^{-h}).
    For |h| >= 1 by the recursion I_0 = 1 - e^{-h}, I_k = h^k / k! - I_{k-1}; below, where that
    recursion cancels (I_k ~ h^{k+1} / (k+1)! is the difference of two terms ~ h^k / k!: relative
    error ~ (k+1)! eps / |h|^k), by the series e^{-h} sum_j h^{k+j+1} / (k! j! (k+j+1)).
    """
    if abs(h) >= 1.0:
        out = [-math.expm1(-h)]
        for k in range(1, order + 1):
            out.append(h ** k / math.factorial(k) - out[-1])
        return out
    scale = math.exp(-h)
    return [scale * math.fsum(h ** (k + j + 1) / (math.factorial(k) * math.factorial(j) * (k + j + 1))
                              for j in range(40)) for k in range(order + 1)]


def _solve_weights(nodes, rhs) -> torch.Tensor:
    """w with sum_j w_j nodes_j^i = rhs_i, i = 0..len(nodes)-1 (a small Vandermonde system)."""
    nodes = torch.as_tensor(nodes, dtype=torch.float64)
    vander = nodes[None, :] ** torch.arange(len(nodes), dtype=torch.float64)[:, None]
    return torch.linalg.solve(vander, torch.as_tensor(rhs, dtype=torch.float64))


def _lambdas(plan) -> list[float]:
    return (-torch.log(plan.gammas)).tolist()  # half-logSNR lambda = -log gamma


_DPMPP_3M_VARIANTS = ("consistent", "reference")


def _dpmpp_3m_weights(plan, variant: str = "consistent", orders=None) -> list:
    """Per step: r, c0 = I_0, c1, c2, r0, r1 (see `dpmpp_3m`); orders: each step's order (default
    min(3, n + 1)). c1 weighs D1 (D1_0 on a second-order step), c2 weighs D2; both 0 where unused."""
    lam, rows = _lambdas(plan), []
    for n, p in enumerate(orders or _step_orders(plan.num_steps, 3, False)):
        h = lam[n + 1] - lam[n]
        i0, i1, i2 = _exp_integrals(h, 2)
        r0 = (lam[n] - lam[n - 1]) / h if n >= 1 else 1.0
        r1 = (lam[n - 1] - lam[n - 2]) / h if n >= 2 else 1.0
        if variant == "reference":  # second order in the 'dpmsolver' form; D2 at half the weight
            c1 = 0.0 if p == 1 else 0.5 * i0 if p == 2 else i1 / h
            c2 = i2 / h ** 2 if p == 3 else 0.0
        else:
            c1 = i1 / h if p >= 2 else 0.0
            c2 = 2 * i2 / h ** 2 if p == 3 else 0.0
        rows.append([math.exp(-h), i0, c1, c2, r0, r1])
    return rows


def dpmpp_3m(model, x, ts, schedule, *, afs=False, denoise=False, backend="auto", net_dtype=None, plan=None,
             variant="consistent", lower_order_final=False):
    """DPM-Solver++(3M) (Lu et al. 2022b, multistep order 3), data prediction, 1 NFE per step.

    With x0(lambda) expanded around lambda_n, r0 = h_{n-1} / h, r1 = h_{n-2} / h (h: steps in lambda),
    D1_0 = (x0_n - x0_{n-1}) / r0, D1_1 = (x0_{n-1} - x0_{n-2}) / r1, D1 = D1_0 + r0 / (r0 + r1)
    (D1_0 - D1_1) ~ h x0' and D2 = (D1_0 - D1_1) / (r0 + r1) ~ h^2 x0'' / 2, a step of order

        3:  x_bar_{n+1} = r x_bar_n + I_0 x0_n + (I_1 / h) D1 + c2 D2,
        2:  x_bar_{n+1} = r x_bar_n + I_0 x0_n + c1 D1_0,
        1:  x_bar_{n+1} = r x_bar_n + I_0 x0_n   (DDIM).

    Step n has order min(3, n + 1) (steps 0 and 1 warm up), lowered at the end by lower_order_final.

    variant:
      "consistent" (default): c2 = 2 I_2 / h^2, which makes the D2 term the I_2 x0'' of the exact
          solution: third order (tests/test_solvers.py measures 3). Its second-order steps use the
          Taylor form c1 = I_1 / h ('taylor' in DPM-Solver's code).
      "reference": the DPM-Solver authors' released multistep third order
          (`multistep_dpm_solver_third_update` in their dpm_solver_pytorch.py, solver_type='dpmsolver',
          which diffusers' DPMSolverMultistepScheduler with solver_order=3 and its default
          solver_type="midpoint" also computes). Its update
          is x_t = (sigma_t / sigma_n) x_n - alpha_t phi_1 x0_n + alpha_t phi_2 D1 - alpha_t phi_3 D2
          with phi_1 = e^{-h} - 1, phi_2 = phi_1 / h + 1 = I_1 / h, phi_3 = phi_2 / h - 1/2 =
          -I_2 / h^2: here c2 = I_2 / h^2, HALF the consistent weight, so each step misses
          I_2 x0'' / 2 = O(h^3) and the method converges at order 2 (measured: 2). Its second-order
          (warm-up) step is their 'dpmsolver' form x_t = (sigma_t / sigma_n) x_n - alpha_t phi_1 x0_n
          - (alpha_t phi_1 / 2) D1_0, here c1 = I_0 / 2 (the update of `dpmpp_2m`), where
          "consistent" uses I_1 / h; the two differ by O(h^3) per step, both second order.
    lower_order_final:
      False (default): no lowering (the orders above).
      True: the DPM-Solver authors' rule (their multistep sampler with lower_order_final=True):
          with fewer than 10 steps, step n has order min(3, n + 1, N - n): the last step first
          order, the one before at most second.
      "diffusers": DPMSolverMultistepScheduler's lower_order_final=True (its default): with fewer
          than 15 steps the last step is first order and, for order 3, the one before second order
          (its lower_order_second): the same orders as True below a higher threshold. diffusers'
          final_sigmas_type="zero" (also its default) makes the last step, which then goes to
          sigma = 0 and gives x0_n, first order at any step count; here a grid ends at t_end > 0
          and that case is denoise=True.
    Defaults: "consistent" and False, what earlier releases computed and what the per-solver grids
    (`AUTO_GRID`) were chosen with (measurements of both options: bench/RESULTS.md, "DPM-Solver++
    variants and lower_order_final (issue 15)").
    """
    if variant not in _DPMPP_3M_VARIANTS:
        raise ValueError(f"dpmpp_3m variant must be one of {_DPMPP_3M_VARIANTS}, got {variant!r}")
    _check_lower_order_final(lower_order_final)
    run = _StepLoop(model, x, ts, schedule, afs, denoise, backend, net_dtype, plan)
    lowered = _lowered(run.num_steps, lower_order_final, "dpm")
    orders = _step_orders(run.num_steps, 3, lowered)
    name = "dpmpp_3m" + ("" if variant == "consistent" else "_" + variant) + ("_lowered" if lowered else "")
    coef = run.plan.weights(name, lambda: _dpmpp_3m_weights(run.plan, variant, orders))
    x_bar, x_n = run.x_bar, x
    m1 = m2 = torch.zeros_like(x_bar)  # x0 at the two previous grid points
    for n in run.steps():
        r, c0, c1, c2, r0, r1 = coef[n]
        m0 = run.x0_pred(x_bar, run.eps(x_n, n), n)
        d1_0 = (m0 - m1) / r0
        d1_1 = (m1 - m2) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1) if orders[n] == 3 else d1_0
        d2 = (d1_0 - d1_1) / (r0 + r1)
        # x_bar_{n+1} = r x_bar_n + I_0 x0_n + c1 D1 + c2 D2
        x_bar = r * x_bar + c0 * m0 + c1 * d1 + c2 * d2
        x_n = run.x_next(x_bar, n)
        m1, m2 = m0, m1
    return run.finish(x_bar, x_n)


def _unipc_weights(plan, order: int, orders=None) -> tuple[list, list, list]:
    """Per step: predictor (r, I_0, a_j), corrector (a_j, a_new) and the r_j of the D_j (see `unipc`);
    orders: each step's order p (default min(order, n + 1))."""
    lam, pred, corr, r_rows = _lambdas(plan), [], [], []
    for n, p in enumerate(orders or _step_orders(plan.num_steps, order, False)):
        h = lam[n + 1] - lam[n]
        ints = _exp_integrals(h, p)
        g = [math.factorial(k) * ints[k] / h ** k for k in range(1, p + 1)]
        r_hist = [(lam[n - j] - lam[n]) / h for j in range(1, p)]
        b_h = math.expm1(-h)
        if p == 1:
            a_pred = []
        elif p == 2:
            a_pred = [-0.5 * b_h]
        else:
            a_pred = _solve_weights(r_hist, g[:-1]).tolist()
        a_corr = [-0.5 * b_h] if p == 1 else _solve_weights(r_hist + [1.0], g).tolist()
        pred.append([math.exp(-h), ints[0]] + a_pred + [0.0] * (order - 1 - len(a_pred)))
        corr.append(a_corr + [0.0] * (order - len(a_corr)))
        r_rows.append(r_hist + [1.0] * (order - p))
    return pred, corr, r_rows


def unipc(model, x, ts, schedule, *, afs=False, denoise=False, backend="auto", net_dtype=None, plan=None,
          order=2, lower_order_final=False):
    """UniPC (Zhao et al. 2023) with B(h) = expm1(-h) ("bh2"), data prediction. 1 NFE per step.

    Predictor UniP-p from the last p data predictions, then corrector UniC with the model output
    at the predicted point, which the next step reuses (no extra NFE). The last step has no
    corrector (it would cost one more evaluation). With r_j = (lambda_j - lambda_n) / h and
    D_j = (x0_j - x0_n) / r_j:  x_bar_{n+1} = r x_bar_n + I_0 x0_n + sum_j a_j D_j, where the a_j
    solve sum_j a_j r_j^(k-1) = k! I_k / h^k (k = 1..p), except the bh2 choices a = -B(h) / 2 for
    the order-2 predictor and the order-1 corrector. Step n has p = min(order, n + 1); its
    corrector adds the new point (order p + 1).
    lower_order_final: False (default): no lowering. True (the UniPC authors' multistep sampler with
    its lower_order_final=True) and "diffusers" (UniPCMultistepScheduler's, on by default there) are
    the same rule, with no step-count threshold in either: p = min(order, n + 1, N - n), i.e. the
    last predictor first order (DDIM), the one before at most second, at every N (so asymptotically
    the order is 2: a first-order last step errs by O(h^2)). Off by default: unipc's grid
    (`AUTO_GRID`) was chosen without it (measurements: bench/RESULTS.md, issue 15).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"unipc order must be 1, 2 or 3, got {order}")
    _check_lower_order_final(lower_order_final)
    run = _StepLoop(model, x, ts, schedule, afs, denoise, backend, net_dtype, plan)
    lowered = _lowered(run.num_steps, lower_order_final, "unipc")
    orders = _step_orders(run.num_steps, order, lowered)
    host = []  # the three host tables, computed once when the plan first needs them

    def table(i):
        host[:] = host or _unipc_weights(run.plan, order, orders)
        return host[i]
    tag = f"unipc{order}" + ("_lowered" if lowered else "")
    pred_c, corr_c, r_c = (run.plan.weights(f"{tag}_{i}", lambda i=i: table(i)) for i in range(3))
    N = run.num_steps
    x_bar, x_n = run.x_bar, x
    m0 = run.x0_pred(x_bar, run.eps(x_n, 0), 0)
    history = []  # earlier data predictions, most recent first
    for n in run.steps():
        p = orders[n]
        c, a_c = pred_c[n], corr_c[n]
        d = [(history[j] - m0) / r_c[n, j] for j in range(p - 1)]
        # predictor: x_bar_{n+1} = r x_bar_n + I_0 x0_n + sum_j a_j D_j
        base = c[0] * x_bar + c[1] * m0
        x_bar_next = base + sum((c[2 + j] * d[j] for j in range(p - 1)), torch.zeros_like(base))
        x_next = run.x_next(x_bar_next, n)
        if n + 1 < N:
            m_next = run.x0_pred(x_bar_next, run.eps(x_next, n + 1), n + 1)
            # corrector: x_bar_{n+1} = r x_bar_n + I_0 x0_n + sum_j a'_j D_j + a'_new (x0_{n+1} - x0_n)
            d_new = m_next - m0
            x_bar_next = base + a_c[p - 1] * d_new + sum((a_c[j] * d[j] for j in range(p - 1)),
                                                          torch.zeros_like(base))
            x_next = run.x_next(x_bar_next, n)
            history = [m0] + history[:order - 2]
            m0 = m_next
        x_bar, x_n = x_bar_next, x_next
    return run.finish(x_bar, x_n)


def _ipndm_weights(plan, order: int) -> list:
    """Per step: Adams-Bashforth weights w_j of eps_{n-j} over the step in gamma (see `ipndm`)."""
    g, rows = plan.gammas.tolist(), []
    for n in range(plan.num_steps):
        p = min(order, n + 1)
        h = g[n + 1] - g[n]
        nodes = [(g[n - j] - g[n]) / h for j in range(p)]  # node s of gamma = gamma_n + s h
        w = _solve_weights(nodes, [1.0 / (i + 1) for i in range(p)]).tolist()
        rows.append(w + [0.0] * (order - p))
    return rows


def ipndm(model, x, ts, schedule, *, afs=False, denoise=False, backend="auto", net_dtype=None, plan=None,
          order=4):
    """Improved PNDM (Zhang & Chen 2023, DEIS sec. 4), with variable-step coefficients.

    Adams-Bashforth of order p = min(order, n + 1) on d x_bar / d gamma = eps: the weights
    integrate the polynomial through (gamma_{n-j}, eps_{n-j}) over the step exactly, so a
    non-uniform time grid keeps the order. 1 NFE per step, no Runge-Kutta warm start.
    """
    if order not in (1, 2, 3, 4):
        raise ValueError(f"ipndm order must be 1..4, got {order}")
    run = _StepLoop(model, x, ts, schedule, afs, denoise, backend, net_dtype, plan)
    weights = run.plan.weights(f"ipndm{order}", lambda: _ipndm_weights(run.plan, order))
    x_bar, x_n = run.x_bar, x
    history = []  # eps_n, eps_{n-1}, ... (most recent first)
    for n in run.steps():
        history = [run.eps(x_n, n).to(run.state_dtype)] + history[:order - 1]
        # x_bar_{n+1} = x_bar_n + h sum_j w_j eps_{n-j}
        eps_ab = sum(weights[n, j] * e for j, e in enumerate(history))
        x_bar, x_n = ops.ddim_step(x_bar, eps_ab, run.rows[n], backend=backend)
    return run.finish(x_bar, x_n)
