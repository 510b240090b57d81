"""Reference samplers for the VP probability-flow ODE, all written in GENIE's DDIM coordinates.

With gamma = sigma / alpha and x_bar = x / alpha = x sqrt(1 + gamma^2), the probability-flow ODE
reads d x_bar / d gamma = eps(x, t(gamma)) (GENIE eq. 5). The data prediction is
x0 = x_bar - gamma eps and the half-logSNR is lambda = -log gamma, so the DPM-Solver family
takes a short form here too: x_bar_next = r x_bar + (1 - r) x0 + ...  with r = gamma_next / gamma.

Every solver has one signature

    solver(model, x, ts, schedule, *, afs=False, denoise=False, backend="auto", **kw) -> (x0, nfe)

model: eps model, called as model(x, schedule.model_time(t)) with t of shape (B,);
x: x_T, (B, C, ...) float32 or float64, the network input at ts[0];
ts: strictly decreasing times (e.g. `time_grid(schedule, N)`), ts[0] = 1 normally;
afs: analytical first step, the network evaluation at (x_T, ts[0]) is replaced by eps = x_T
     (and d eps / d gamma = 0), 0 NFE (GENIE sec. 3.3);
denoise: a final step x0 = x_bar_N - gamma_N eps(x_N, t_N), +1 NFE;
returns the samples (x's dtype) and the network evaluations spent (`nfe_of` gives it ahead).

Step math goes through `genie_fast.ops` (one row of `coeff_table` per step) where an op exists,
so fused kernels slot in behind `ops`; the other solvers write the PyTorch math here with
per-step scalars computed once on the host. Nothing in a loop syncs host and device.
"""
from __future__ import annotations

import math

import torch

from . import ops
from .schedule import COL, coeff_table

__all__ = ["SOLVERS", "NFE_PER_STEP", "nfe_of", "steps_for_nfe", "exact_deps",
           "ddim", "genie", "genie_exact", "heun", "dpm_solver_2", "dpmpp_2m", "dpmpp_3m",
           "unipc", "ipndm"]


# --------------------------------------------------------------------------- shared preamble

class _Run:
    """What every solver sets up before its loop, factored once.

    Validates the inputs, puts the coefficient table and the grid times on x's device, builds
    x_bar_0, counts network evaluations (a python int: no sync) and implements AFS and the
    final denoising step.
    """

    def __init__(self, model, x, ts, schedule, afs, backend):
        if not callable(model):
            raise TypeError(f"model must be a callable eps(x, t), got {type(model).__name__}")
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
            raise ValueError("x must be a floating-point tensor of shape (B, C, ...), got "
                             + (f"shape {tuple(x.shape)} dtype {x.dtype}" if isinstance(x, torch.Tensor)
                                else type(x).__name__))
        if backend not in ops.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {ops.BACKENDS}")
        ts = torch.as_tensor(ts, dtype=torch.float64).detach().cpu().flatten()
        if len(ts) < 2:
            raise ValueError("ts needs at least two times (one step)")
        if not bool((ts[1:] < ts[:-1]).all()) or not bool((ts > 0).all()):
            raise ValueError(f"ts must be positive and strictly decreasing, got {ts.tolist()}")
        self.model, self.schedule, self.afs, self.backend = model, schedule, bool(afs), backend
        self.ts = ts                                  # host float64, N + 1 times
        self.num_steps = len(ts) - 1
        self.gammas = schedule.gamma(ts)              # host float64
        self.table = coeff_table(schedule, ts).to(x.device)
        self.state_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.time_dtype = self.state_dtype
        self.x_T = x
        self.t = self.device_vector(ts)
        self.batch = x.shape[0]
        self.nfe = 0
        self.x_bar = x.to(self.state_dtype) * self.table[0, COL["scale"]].to(self.state_dtype)

    def device_vector(self, values) -> torch.Tensor:
        """Host float64 values -> one tensor on x's device (copied once, before the loop)."""
        values = torch.as_tensor(values, dtype=torch.float64)
        return values.to(self.x_T.device, self.time_dtype)

    def call(self, fn, x, t):
        """fn(x, model time) at the continuous time t (a 0-d device tensor); counts one NFE."""
        self.nfe += 1
        return fn(x, self.schedule.model_time(t.expand(self.batch)))

    def eps(self, x, n):
        """eps at grid time t_n; with AFS the evaluation at (x_T, t_0) is x_T itself, 0 NFE."""
        if n == 0 and self.afs:
            return self.x_T
        return self.call(self.model, x, self.t[n])

    def x0_pred(self, x_bar, eps, n):
        """Data prediction x0 = x_bar - gamma_n eps at grid point n (state dtype)."""
        return x_bar - self.table[n, COL["gamma"]].to(self.state_dtype) * eps.to(self.state_dtype)

    def finish(self, x_bar, x, denoise):
        """Final denoising (x0 = x_bar_N - gamma_N eps(x_N, t_N), +1 NFE) or the plain x_N."""
        if denoise:
            eps = self.call(self.model, x, self.t[-1])
            x = ops.denoise_step(x_bar, eps, self.table[-1], backend=self.backend)
        return x.to(self.x_T.dtype), self.nfe


def _afs_step(run, n):
    """True when step n is the analytical first step (a DDIM step with eps = x_T, deps = 0)."""
    return n == 0 and run.afs


def exact_deps(model, x, t, eps, schedule):
    """d eps / d gamma along the ODE at (x, t) by one forward-mode JVP (GENIE sec. 3.1).

    x: (B, C, ...) network input at the continuous times t (B,); eps = model(x, model_time(t)).
    The tangent is dx/dgamma = eps / sqrt(1 + gamma^2) - x gamma / (1 + gamma^2) and dt/dgamma.
    The JVP evaluates the network's primal again and carries the tangent (about two forward
    passes of work), so `genie_exact` counts it as 2 NFE.
    """
    t = t.contiguous()  # forward AD refuses expanded (stride-0) primals
    gamma = schedule.gamma(t)
    one_g2 = (1.0 + gamma * gamma).view(-1, *([1] * (x.dim() - 1)))
    dx = (eps / one_g2.sqrt() - x * gamma.view_as(one_g2) / one_g2).to(x.dtype)
    dt = schedule.dt_dgamma(gamma).to(t.dtype)
    _, deps = torch.func.jvp(lambda x_, t_: model(x_, schedule.model_time(t_)), (x, t), (dx, dt))
    return deps


# --------------------------------------------------------------------------- Taylor solvers

def ddim(model, x, ts, schedule, *, afs=False, denoise=False, backend="auto"):
    """DDIM (Song et al. 2021) = Euler in gamma on d x_bar / d gamma = eps. 1 NFE per step."""
    run = _Run(model, x, ts, schedule, afs, backend)
    x_bar, x_n = run.x_bar, x
    for n in range(run.num_steps):
        eps = run.eps(x_n, n)
        # x_bar_{n+1} = x_bar_n + h eps_n
        x_bar, x_n = ops.ddim_step(x_bar, eps, run.table[n], backend=backend)
    return run.finish(x_bar, x_n, denoise)


def _genie_eval(model, head):
    """Picks how `genie` gets (eps, d eps/d gamma information) from the model, once."""
    if head is not None:
        if not callable(head):
            raise TypeError(f"head must be a callable head(x, t, eps) -> deps, got {type(head).__name__}")

        def with_head(x, t):
            eps = model(x, t)
            return eps, head(x, t, eps)
        return with_head, "deps"
    if callable(getattr(model, "eps_and_head", None)):
        return model.eps_and_head, "head"
    if callable(getattr(model, "eps_and_deps", None)):
        return model.eps_and_deps, "deps"
    raise TypeError(
        "genie needs d eps/d gamma: give a model with eps_and_head(x, t) (a distilled GENIE head) "
        "or eps_and_deps(x, t), or pass head=callable(x, t, eps) -> deps; "
        "for exact derivatives by autodiff use solver 'genie_exact'")


def genie(model, x, ts, schedule, *, afs=False, denoise=False, backend="auto", head=None):
    """GENIE (Dockhorn et al. 2022, eq. 9): second-order truncated Taylor step in gamma,

        x_bar_{n+1} = x_bar_n + h eps_n + h^2 / 2 * (d eps / d gamma)_n,

    with d eps/d gamma from the distilled head: model.eps_and_head (raw [h1|h2|h3], combined in
    the fused op), model.eps_and_deps, or head(x, t, eps) -> deps (t: the model time the network
    received, eps: its output). 1 NFE per step (the paper's
    accounting: the head costs a few percent of a network evaluation).
    """
    evaluate, kind = _genie_eval(model, head)
    run = _Run(model, x, ts, schedule, afs, backend)
    x_bar, x_n = run.x_bar, x
    for n in range(run.num_steps):
        row = run.table[n]
        if _afs_step(run, n):  # eps = x_T, deps = 0: a DDIM step
            x_bar, x_n = ops.ddim_step(x_bar, run.x_T, row, backend=backend)
            continue
        eps, d = run.call(evaluate, x_n, run.t[n])
        if kind == "head":
            x_bar, x_n = ops.genie_step(x_bar, eps, d, row, backend=backend)
        else:
            x_bar, x_n = ops.taylor_step(x_bar, eps, d, row, backend=backend)
    return run.finish(x_bar, x_n, denoise)


def genie_exact(model, x, ts, schedule, *, afs=False, denoise=False, backend="auto"):
    """GENIE's Taylor step with d eps/d gamma from forward-mode autodiff (the head's teacher).

    3 NFE per step: eps (1) and a JVP through the network (`exact_deps`, counted 2).
    With AFS the first step (a DDIM step with eps = x_T) costs nothing.
    """
    run = _Run(model, x, ts, schedule, afs, backend)
    x_bar, x_n = run.x_bar, x
    for n in range(run.num_steps):
        row = run.table[n]
        if _afs_step(run, n):
            x_bar, x_n = ops.ddim_step(x_bar, run.x_T, row, backend=backend)
            continue
        eps = run.eps(x_n, n)
        deps = exact_deps(model, x_n, run.t[n].expand(run.batch), eps, schedule)
        run.nfe += 2
        x_bar, x_n = ops.taylor_step(x_bar, eps, deps, row, backend=backend)
    return run.finish(x_bar, x_n, denoise)


# --------------------------------------------------------------------------- Runge-Kutta solvers

def heun(model, x, ts, schedule, *, afs=False, denoise=False, backend="auto"):
    """Heun's method in gamma (Karras et al. 2022, Alg. 1, on the DDIM ODE). 2 NFE per step.

    x_bar' = x_bar_n + h eps_n;  x_bar_{n+1} = x_bar_n + h (eps_n + eps(x', t_{n+1})) / 2.
    """
    run = _Run(model, x, ts, schedule, afs, backend)
    x_bar, x_n = run.x_bar, x
    for n in range(run.num_steps):
        row = run.table[n]
        eps = run.eps(x_n, n)
        _, x_pred = ops.ddim_step(x_bar, eps, row, backend=backend)
        eps_pred = run.eps(x_pred, n + 1)
        x_bar, x_n = ops.ddim_step(x_bar, 0.5 * (eps + eps_pred), row, backend=backend)
    return run.finish(x_bar, x_n, denoise)


def dpm_solver_2(model, x, ts, schedule, *, afs=False, denoise=False, backend="auto"):
    """DPM-Solver-2 (Lu et al. 2022, Alg. 1, r1 = 1/2), singlestep, noise prediction. 2 NFE/step.

    In x_bar it is the midpoint rule in gamma with the midpoint at half logSNR,
    gamma_mid = sqrt(gamma_n gamma_{n+1}):
    u_bar = x_bar_n + (gamma_mid - gamma_n) eps_n;  x_bar_{n+1} = x_bar_n + h eps(u, t_mid).
    """
    run = _Run(model, x, ts, schedule, afs, backend)
    g = run.gammas
    t_mid = schedule.t_of_gamma(torch.sqrt(g[:-1] * g[1:]))
    # coefficient rows of the half steps t_n -> t_mid_n: the even rows of the interleaved grid
    interleaved = torch.cat([torch.stack([run.ts[:-1], t_mid], 1).flatten(), run.ts[-1:]])
    half = coeff_table(schedule, interleaved)[0::2].to(x.device)
    t_mid = run.device_vector(t_mid)
    x_bar, x_n = run.x_bar, x
    for n in range(run.num_steps):
        eps = run.eps(x_n, n)
        _, u = ops.ddim_step(x_bar, eps, half[n], backend=backend)
        eps_mid = run.call(model, u, t_mid[n])
        x_bar, x_n = ops.ddim_step(x_bar, eps_mid, run.table[n], backend=backend)
    return run.finish(x_bar, x_n, denoise)


# --------------------------------------------------------------------------- multistep solvers

def dpmpp_2m(model, x, ts, schedule, *, afs=False, denoise=False, backend="auto"):
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2), data prediction, 1 NFE per step.

    x_bar_{n+1} = r x_bar_n + (1 - r) (a x0_n + b x0_{n-1}); the first step is DDIM (b = 0).
    """
    run = _Run(model, x, ts, schedule, afs, backend)
    x_bar, x_n = run.x_bar, x
    x0_prev = torch.zeros_like(x_bar)
    for n in range(run.num_steps):
        eps = run.eps(x_n, n)
        x_bar, x_n, x0_prev = ops.dpmpp_2m_step(x_bar, eps, x0_prev, run.table[n], backend=backend)
    return run.finish(x_bar, x_n, denoise)


def _exp_integrals(h: float, order: int) -> list[float]:
    """I_k = e^{-h} int_0^h tau^k / k! e^tau dtau, k = 0..order (h > 0: one step in lambda).

    They weigh the Taylor terms of x0(lambda) in the exact solution
    x_bar_next = r x_bar + sum_k I_k d^k x0 / d lambda^k  (r = e^{-h}).
    """
    out = [-math.expm1(-h)]
    for k in range(1, order + 1):
        out.append(h ** k / math.factorial(k) - out[-1])
    return out


def _solve_weights(nodes, rhs) -> torch.Tensor:
    """w with sum_j w_j nodes_j^i = rhs_i, i = 0..len(nodes)-1 (a small Vandermonde system)."""
    nodes = torch.as_tensor(nodes, dtype=torch.float64)
    vander = nodes[None, :] ** torch.arange(len(nodes), dtype=torch.float64)[:, None]
    return torch.linalg.solve(vander, torch.as_tensor(rhs, dtype=torch.float64))


def _lambdas(run) -> list[float]:
    return (-torch.log(run.gammas)).tolist()  # half-logSNR lambda = -log gamma, increasing


def dpmpp_3m(model, x, ts, schedule, *, afs=False, denoise=False, backend="auto"):
    """DPM-Solver++(3M) (Lu et al. 2022b, multistep order 3), data prediction, 1 NFE per step.

    With x0(lambda) expanded around lambda_n, D1 ~ h x0' and D2 ~ h^2 x0'' / 2 from the last three
    data predictions:  x_bar_{n+1} = r x_bar_n + I_0 x0_n + (I_1 / h) D1 + (2 I_2 / h^2) D2.
    Steps 0 and 1 use orders 1 and 2.
    """
    run = _Run(model, x, ts, schedule, afs, backend)
    lam = _lambdas(run)
    rows = []  # per step: r, c0 = I_0, c1 = I_1 / h, c2 = 2 I_2 / h^2, r0, r1
    for n in range(run.num_steps):
        h = lam[n + 1] - lam[n]
        i0, i1, i2 = _exp_integrals(h, 2)
        r0 = (lam[n] - lam[n - 1]) / h if n >= 1 else 1.0
        r1 = (lam[n - 1] - lam[n - 2]) / h if n >= 2 else 1.0
        rows.append([math.exp(-h), i0, i1 / h if n >= 1 else 0.0, 2 * i2 / h ** 2 if n >= 2 else 0.0, r0, r1])
    coef = run.device_vector(rows).to(run.state_dtype)
    x_bar, x_n = run.x_bar, x
    m1 = m2 = torch.zeros_like(x_bar)  # x0 at the two previous grid points
    for n in range(run.num_steps):
        r, c0, c1, c2, r0, r1 = coef[n]
        m0 = run.x0_pred(x_bar, run.eps(x_n, n), n)
        d1_0 = (m0 - m1) / r0
        d1_1 = (m1 - m2) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1) if n >= 2 else d1_0
        d2 = (d1_0 - d1_1) / (r0 + r1)
        x_bar = r * x_bar + c0 * m0 + c1 * d1 + c2 * d2
        x_n = (x_bar * run.table[n, COL["inv_scale_next"]].to(run.state_dtype)).to(x.dtype)
        m1, m2 = m0, m1
    return run.finish(x_bar, x_n, denoise)


def unipc(model, x, ts, schedule, *, afs=False, denoise=False, backend="auto", order=2):
    """UniPC (Zhao et al. 2023) with B(h) = expm1(-h) ("bh2"), data prediction. 1 NFE per step.

    Predictor UniP-p from the last p data predictions, then corrector UniC with the model output
    at the predicted point, which the next step reuses (no extra NFE). The last step has no
    corrector (it would cost one more evaluation). With r_j = (lambda_j - lambda_n) / h and
    D_j = (x0_j - x0_n) / r_j:  x_bar_{n+1} = r x_bar_n + I_0 x0_n + sum_j a_j D_j, where the a_j
    solve sum_j a_j r_j^(k-1) = k! I_k / h^k (k = 1..p), except the bh2 choices a = -B(h) / 2 for
    the order-2 predictor and the order-1 corrector.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"unipc order must be 1, 2 or 3, got {order}")
    run = _Run(model, x, ts, schedule, afs, backend)
    lam, N = _lambdas(run), run.num_steps
    # per step, on the host: predictor (r, I_0, a_j), corrector weights (a_j, a_new), the r_j of the D_j
    pred, corr, r_rows = [], [], []
    for n in range(N):
        h = lam[n + 1] - lam[n]
        p = min(order, n + 1)  # model values available: x0_n and p - 1 earlier ones
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
    pred_c, corr_c, r_c = (run.device_vector(rows).to(run.state_dtype) for rows in (pred, corr, r_rows))
    x_bar, x_n = run.x_bar, x
    m0 = run.x0_pred(x_bar, run.eps(x_n, 0), 0)
    history = []  # earlier data predictions, most recent first
    for n in range(N):
        p = min(order, n + 1)
        c, a_c = pred_c[n], corr_c[n]
        d = [(history[j] - m0) / r_c[n, j] for j in range(p - 1)]
        # predictor: x_bar_{n+1} = r x_bar_n + I_0 x0_n + sum_j a_j D_j
        base = c[0] * x_bar + c[1] * m0
        x_bar_next = base + sum((c[2 + j] * d[j] for j in range(p - 1)), torch.zeros_like(base))
        x_next = (x_bar_next * run.table[n, COL["inv_scale_next"]].to(run.state_dtype)).to(x.dtype)
        if n + 1 < N:
            m_next = run.x0_pred(x_bar_next, run.eps(x_next, n + 1), n + 1)
            # corrector: the same form with the new point (r = 1) joining the history
            d_new = m_next - m0
            x_bar_next = base + a_c[p - 1] * d_new + sum((a_c[j] * d[j] for j in range(p - 1)),
                                                          torch.zeros_like(base))
            x_next = (x_bar_next * run.table[n, COL["inv_scale_next"]].to(run.state_dtype)).to(x.dtype)
            history = [m0] + history[:order - 2]
            m0 = m_next
        x_bar, x_n = x_bar_next, x_next
    return run.finish(x_bar, x_n, denoise)


def ipndm(model, x, ts, schedule, *, afs=False, denoise=False, backend="auto", order=4):
    """Improved PNDM (Zhang & Chen 2023, DEIS sec. 4), with variable-step coefficients.

    Adams-Bashforth of order p = min(order, n + 1) on d x_bar / d gamma = eps: the weights
    integrate the polynomial through (gamma_{n-j}, eps_{n-j}) over the step exactly, so a
    non-uniform time grid keeps the order. 1 NFE per step, no Runge-Kutta warm start.
    """
    if order not in (1, 2, 3, 4):
        raise ValueError(f"ipndm order must be 1..4, got {order}")
    run = _Run(model, x, ts, schedule, afs, backend)
    g, N = run.gammas.tolist(), run.num_steps
    rows = []
    for n in range(N):
        p = min(order, n + 1)
        h = g[n + 1] - g[n]
        nodes = [(g[n - j] - g[n]) / h for j in range(p)]  # node s of gamma = gamma_n + s h
        w = _solve_weights(nodes, [1.0 / (i + 1) for i in range(p)]).tolist()
        rows.append(w + [0.0] * (order - p))
    weights = run.device_vector(rows).to(run.state_dtype)
    x_bar, x_n = run.x_bar, x
    history = []  # eps_n, eps_{n-1}, ... (most recent first)
    for n in range(N):
        history = [run.eps(x_n, n).to(run.state_dtype)] + history[:order - 1]
        # x_bar_{n+1} = x_bar_n + h sum_j w_j eps_{n-j}
        eps_ab = sum(weights[n, j] * e for j, e in enumerate(history))
        x_bar, x_n = ops.ddim_step(x_bar, eps_ab, run.table[n], backend=backend)
    return run.finish(x_bar, x_n, denoise)


SOLVERS = {
    "ddim": ddim,
    "genie": genie,
    "genie_exact": genie_exact,
    "heun": heun,
    "dpm_solver_2": dpm_solver_2,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_3m": dpmpp_3m,
    "unipc": unipc,
    "ipndm": ipndm,
}

# Network evaluations per step; AFS saves one evaluation (genie_exact: the whole 3-NFE step).
NFE_PER_STEP = {name: 1 for name in SOLVERS} | {"heun": 2, "dpm_solver_2": 2, "genie_exact": 3}


def _check_solver(solver: str):
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")


def nfe_of(solver: str, steps: int, afs: bool = False, denoise: bool = False) -> int:
    """Network evaluations `solver` spends on `steps` steps (what it returns as nfe)."""
    _check_solver(solver)
    per_step = NFE_PER_STEP[solver]
    afs_saving = per_step if solver == "genie_exact" else 1
    return steps * per_step - (afs_saving if afs else 0) + (1 if denoise else 0)


def steps_for_nfe(solver: str, nfe: int, afs: bool = False, denoise: bool = False) -> int:
    """The most steps whose cost fits the NFE budget (0 when not even one step fits).

    A budget that does not divide is rounded down: e.g. heun with nfe=9 takes 4 steps, 8 NFE.
    """
    _check_solver(solver)
    steps = 0
    while nfe_of(solver, steps + 1, afs, denoise) <= nfe:
        steps += 1
    return steps
