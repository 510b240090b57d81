"""genie_multistep: GENIE's head inside a multistep exponential integrator in log-SNR, with its
quadrature weights and the blend of the head's derivative with the history's secants."""
from __future__ import annotations

import math
import warnings

import torch

from .. import ops
from ..schedule import COL
from .loop import _StepLoop
from .multistep import _exp_integrals, _lambdas
from .taylor import _genie_eval


# Node sets of the predictor and corrector per order, as (value nodes, derivative nodes); node j >= 0
# is the grid point n - j (n: the step's start), j = -1 the step's end. Each pair is (head form,
# history form): the first uses the head's derivative, the second only data predictions; both have
# the same order, and the step blends them (see `genie_multistep`).
_MULTISTEP_NODES = {
    3: {"predictor": (((0,), (0,)), ((0, 1), ())),
        "corrector": (((0, -1), (-1,)), ((0, 1, -1), ()))},
    4: {"predictor": (((0, 1), (0,)), ((0, 1, 2), ())),
        "corrector": (((0, -1), (0, -1)), ((0, 1, 2, -1), ()))},
}
# Relative error of a distilled head's d eps / d gamma against the exact JVP, for a model that does
# not declare its own ``head_error``: a rounded, conservative figure for the bundled model's head
# (measured 0.535 pooled, bench/RESULTS.md).
DEFAULT_HEAD_ERROR = 0.55


def _moment_weights(values, derivs, node, h: float) -> dict:
    """Quadrature weights of the exponential integrator over one step in lambda.

    Finds a_j, b_j with  sum_j a_j x0(lambda_j) + sum_j b_j x0'(lambda_j) = int_0^h e^{-(h-tau)} x0 dtau
    for every polynomial x0 of degree < len(values) + len(derivs), i.e. for x0 = tau^k / k! the moment
    I_k (`_exp_integrals`). node(j): the node's offset from the step's start in units of h.
    Returns {(j, "x0" | "d"): weight}; the derivative weights include the factor h.
    """
    m = len(values) + len(derivs)
    ints = _exp_integrals(h, m - 1)
    rhs = [math.factorial(k) * ints[k] / h ** k for k in range(m)]
    rows = [[node(j) ** k for j in values] + [k * node(j) ** (k - 1) if k else 0.0 for j in derivs]
            for k in range(m)]
    w = torch.linalg.solve(torch.tensor(rows, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64)).tolist()
    out = {(j, "x0"): w[i] for i, j in enumerate(values)}
    out.update({(j, "d"): w[len(values) + i] * h for i, j in enumerate(derivs)})
    return out


def head_weight(h: float, head_error: float) -> float:
    """theta in [0, 1], the blend share of the head: the share of the head form in a `genie_multistep`
    step of size h in lambda (not to be confused with the head weights w1..w3 of the coefficient table).

    Both forms estimate the same Taylor terms of x0(lambda); their errors are weighed as if
    independent: the head's is head_error |x0'| (relative error of the distilled derivative), the
    history's that of a secant over the step, about |h| / 2 |x0''| with |x0''| ~ |x0'| (x0 changes on
    the scale of one unit of lambda). Inverse-variance weighting gives
    theta = (h/2)^2 / (head_error^2 + (h/2)^2): an exact head (0) is used alone, a poor one
    only for large steps, where the history's secants are poor too.
    """
    q = (0.5 * h) ** 2
    return 1.0 if head_error == 0 else q / (head_error ** 2 + q)


def _blended(forms, points: int, h: float, node, theta: float) -> dict:
    """theta * head form + (1 - theta) * history form (theta: the blend share of the head,
    `head_weight`), their nodes cut to the `points` grid points computed so far (the first steps
    lack history: their order is lower); the head form alone while the history form would be a
    single point."""
    (hv, hd), (sv, sd) = ((tuple(j for j in v if j < points), d) for v, d in forms)
    if len(sv) + len(sd) < 2:
        theta = 1.0
    out: dict = {}
    for (values, derivs), share in (((hv, hd), theta), ((sv, sd), 1.0 - theta)):
        if share:
            for key, w in _moment_weights(values, derivs, node, h).items():
                out[key] = out.get(key, 0.0) + share * w
    return out


def _genie_multistep_weights(plan, order: int, head_error: float, lower_order_final: bool) -> list:
    """One row of `ops.MULTISTEP_WEIGHTS` per network evaluation m = 0..N-1 (see `genie_multistep`).

    Row m: the corrector of step m - 1 (identity for m = 0), the predictor of step m, and
    1 / sqrt(1 + gamma_{m+1}^2). The data prediction of grid point p lives in x0 slot p % 3 and its
    derivative in d slot p % 2; the point m itself is the op's new x0 and d.
    """
    lam, gam = _lambdas(plan), plan.gammas.tolist()
    k = ops.MULTISTEP_TERMS
    nodes = _MULTISTEP_NODES[order]
    rows = []

    def place(row, base, coef, start, new):
        for (j, what), w in coef.items():
            p = start - j if j >= 0 else start + 1
            if p == new:
                row[base + (1 if what == "x0" else 2)] += w
            elif what == "x0":
                row[base + 3 + p % ops.MULTISTEP_X0_SLOTS] += w
            else:
                row[base + 3 + ops.MULTISTEP_X0_SLOTS + p % ops.MULTISTEP_D_SLOTS] += w

    for m in range(plan.num_steps):
        row = [0.0] * ops.MULTISTEP_WEIGHTS
        if m == 0:
            row[0] = 1.0
        else:  # corrector of step n = m - 1: its end point m is the new one
            n, h = m - 1, lam[m] - lam[m - 1]
            coef = _blended(nodes["corrector"], n + 1, h,
                            lambda j: 1.0 if j < 0 else (lam[n - j] - lam[n]) / h, head_weight(h, head_error))
            row[0] = math.exp(-h)
            place(row, 0, coef, n, m)
        h = lam[m + 1] - lam[m]
        forms = nodes["predictor"]
        if lower_order_final and m == plan.num_steps - 1 and plan.num_steps < 10:
            forms = (((0,), (0,)), ((0,), (0,)))  # the head form of order 3 alone, no history
        coef = _blended(forms, m + 1, h, lambda j: (lam[m - j] - lam[m]) / h, head_weight(h, head_error))
        row[k] = math.exp(-h)
        place(row, k, coef, m, m)
        row[2 * k] = 1.0 / math.sqrt(1.0 + gam[m + 1] ** 2)
        rows.append(row)
    return rows


def _declared_head_error(model, head) -> float:
    """The head's relative error as its owner declares it: a ``head=`` callable's own ``head_error``
    attribute (the model's figure describes the model's head, not this one), else the model's
    ``head_error`` (a saved GenieModel carries its measured error; None for files written before it
    was recorded), else DEFAULT_HEAD_ERROR. A ``head=`` without ``head_error`` is warned about: the
    blend then trusts it as little as the bundled head, which wastes an exact head."""
    if head is not None:
        declared = getattr(head, "head_error", None)
        if declared is None:
            warnings.warn("genie_multistep: head= has no head_error attribute and none was passed; assuming "
                          f"{DEFAULT_HEAD_ERROR} (pass head_error=0.0 for an exact head, or the head's measured "
                          "relative error)", UserWarning, stacklevel=4)
            return DEFAULT_HEAD_ERROR
        return declared
    declared = getattr(model, "head_error", None)
    return DEFAULT_HEAD_ERROR if declared is None else declared


def genie_multistep(model, x, ts, schedule, *, afs=False, denoise=False, backend="auto", net_dtype=None,
                    plan=None, head=None, order=3, head_error=None, lower_order_final=False):
    """GENIE's head in a multistep exponential integrator: data prediction in log-SNR. 1 NFE per step.

    In lambda = -log gamma the ODE is d x_bar / d lambda = x0 - x_bar, solved exactly by
    x_bar_{n+1} = r x_bar_n + int_0^h e^{-(h-tau)} x0(lambda_n + tau) dtau  (r = e^{-h}), and the
    head gives the derivative of the integrand: d x0 / d lambda = gamma^2 d eps / d gamma.
    Each step is a UniPC-style predictor-corrector in which the integral is replaced by a
    quadrature over earlier data predictions x0_j and derivatives d_j = gamma_j^2 deps_j
    (`_moment_weights`: exact for polynomials of the given degree):
      order 3 (default): predictor from (x0_n, d_n) [head form] blended with (x0_n, x0_{n-1})
        [history form], both local error O(h^3); corrector with the new evaluation at the
        predicted point, (x0_n, x0_{n+1}, d_{n+1}) blended with (x0_{n-1}, x0_n, x0_{n+1}), local
        error O(h^4): global order 3.
      order 4: predictor (x0_n, x0_{n-1}, d_n) with (x0_n, x0_{n-1}, x0_{n-2}); corrector
        (x0_n, x0_{n+1}, d_n, d_{n+1}) with (x0_{n-2}..x0_{n+1}): global order 4 (for exact heads).
    The blend share of the head, theta = `head_weight(h, head_error)`, trusts the head in proportion
    to how good it is against the history's secants (head_error: the head's relative error, from the
    argument, else `_declared_head_error`: a head= callable's or the model's ``head_error``; 0 = exact).
    The evaluation at the predicted point is reused by the next step (no extra NFE), and the last
    step has no corrector. lower_order_final: below 10 steps the last predictor uses the head
    form alone (order 3 local, no history). Derivation and error constants: docs/method.md.
    head: as for `genie` (a callable head(x, t, eps) -> deps, or the model's eps_and_head /
    eps_and_deps). The whole update, the head-output combination included, is one fused op per
    evaluation (`ops.genie_multistep_step`).
    """
    if order not in _MULTISTEP_NODES:
        raise ValueError(f"genie_multistep order must be one of {sorted(_MULTISTEP_NODES)}, got {order!r}")
    if head_error is None:
        head_error = _declared_head_error(model, head)
    if isinstance(head_error, bool) or not isinstance(head_error, (int, float)) \
            or not math.isfinite(head_error) or head_error < 0:
        raise ValueError(f"head_error must be a finite number >= 0 (the head's relative error), got {head_error!r}")
    if not isinstance(lower_order_final, bool):
        raise ValueError(f"lower_order_final must be True or False, got {lower_order_final!r}")
    evaluate, kind = _genie_eval(model, head, "genie_multistep")
    run = _StepLoop(model, x, ts, schedule, afs, denoise, backend, net_dtype, plan)
    weights = run.plan.weights(f"genie_multistep{order}_{float(head_error)!r}_{lower_order_final}",
                               lambda: _genie_multistep_weights(run.plan, order, float(head_error),
                                                                lower_order_final))
    st = run.state_dtype
    x0_hist = x.new_zeros((ops.MULTISTEP_X0_SLOTS, *x.shape), dtype=st)
    d_hist = x.new_zeros((ops.MULTISTEP_D_SLOTS, *x.shape), dtype=st)
    x_bar, x_bar_pred = run.x_bar, torch.empty_like(run.x_bar)
    x_n = x if x.dtype == run.net_dtype else x.to(run.net_dtype)
    x_pred = torch.empty_like(x_n)
    grad = torch.is_grad_enabled()  # a differentiable run (head fine-tuning): no buffer autograd saved is reused
    for m in run.steps():
        if grad:
            x_pred = torch.empty_like(x_n)
        if run.afs_step(m):  # eps = x_T, d eps / d gamma = 0
            eps = run.x_T.to(run.net_dtype)
            head_out = eps.new_zeros((x.shape[0], 3 * x.shape[1], *x.shape[2:]))
        else:
            eps, head_out = run.call(evaluate, x_n, run.plan.t_net[m])
            if kind == "deps":  # pack as a raw head [-gamma deps | 0 | 0]: w1 = -1 / gamma recovers deps
                head_out = torch.cat([-run.rows[m, COL["gamma"]].to(head_out.dtype) * head_out,
                                      torch.zeros_like(head_out), torch.zeros_like(head_out)], dim=1)
        # corrector of step m - 1, then predictor of step m, both (weights: _genie_multistep_weights)
        # x_bar_{n+1} = r x_bar_n + sum_j a_j x0_j + sum_j b_j d_j  (d_j = gamma_j^2 deps_j)
        ops.genie_multistep_step(x_bar, x_bar if m == 0 else x_bar_pred, eps, head_out, x0_hist, d_hist,
                                 weights[m], run.rows[m], backend=backend,
                                 out=(x_bar, x_bar_pred, x_pred, x0_hist[m % ops.MULTISTEP_X0_SLOTS],
                                      d_hist[m % ops.MULTISTEP_D_SLOTS]))
        x_n = x_pred
    return run.finish(x_bar_pred, x_pred)
