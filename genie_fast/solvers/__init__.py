"""Samplers for the VP probability-flow ODE, each written once, in GENIE's DDIM coordinates.

With gamma = sigma / alpha and x_bar = x / alpha = x sqrt(1 + gamma^2), the probability-flow ODE
reads d x_bar / d gamma = eps(x, t(gamma)) (GENIE eq. 5). The data prediction is
x0 = x_bar - gamma eps and the half-logSNR is lambda = -log gamma, so the DPM-Solver family
takes a short form here too: x_bar_next = r x_bar + (1 - r) x0 + ...  with r = gamma_next / gamma.

Every solver has one signature

    solver(model, x, ts, schedule, *, afs=False, denoise=False, backend="auto",
           net_dtype=None, plan=None, **kw) -> (x_out, nfe)

model: eps model, called as model(x, schedule.model_time(t)) with t of shape (B,). A model may
    declare ``evals_per_call`` (an int, default 1): the network evaluations one call costs per
    sample (e.g. 2 for a classifier-free-guidance wrapper that runs a doubled batch); every NFE
    count is multiplied by it.
x: the state at ts[0] (x_T when sampling), (B, C, ...). The ODE state x_bar runs in float64 when x
    is float64, else in float32; the result comes back in x's dtype.
ts: strictly monotone times, e.g. `time_grid(schedule, N)`. Decreasing (t = 1 -> t_end) samples;
    increasing (t_end -> 1) integrates the same ODE forward, i.e. encodes data into latents.
afs: analytical first step, the network evaluation at (x_T, ts[0]) is replaced by eps = x_T
    (and d eps / d gamma = 0), 1 NFE less (GENIE sec. 3.3). Sampling only.
denoise: a final step x0 = x_bar_N - gamma_N eps(x_N, t_N), +1 NFE. Sampling only.
net_dtype: the dtype the network receives x in (default x's dtype): a float32 state with a
    half-precision network is what `SamplingEngine` runs on a GPU.
plan: the `Plan` of (schedule, ts, batch, device, state dtype): every per-step coefficient and
    network time on x's device, built once. None builds one here, before the loop;
    `SamplingEngine` memoises one per key.
returns the result (x's dtype) and the network evaluations spent per sample (`nfe_of`).

Capture safety: with its plan built, a solver's loop reads nothing from the host, copies nothing
to the device and allocates nothing whose size depends on data, so `SamplingEngine` captures
the whole call into one CUDA graph. The step math goes through `genie_fast.ops` where a fused op
exists (one row of the plan's coefficient table per step); the other solvers write the PyTorch
math here with per-step weights computed on the host once per plan.

Modules: plan (`Plan`, `check_grid`), accounting (NFE counts; the registry `SOLVERS`, filled
below), jvp (forward-mode JVPs), finite (output checks, `find_nonfinite`), loop (`_StepLoop`, what
every solver shares), taylor (ddim, genie, genie_exact), runge_kutta (heun, dpm_solver_2),
multistep (dpmpp_2m, dpmpp_3m, unipc, ipndm), genie_multistep, options (defaults, `resolve`).
"""
from __future__ import annotations

from ..profiling import pop, push  # noqa: F401  (loop.py's NVTX ranges go through these names)
from .accounting import JVP_NFE, NFE_PER_STEP, SOLVERS, evals_per_call, nfe_of, steps_for_nfe
from .finite import NonFiniteError, find_nonfinite
from .genie_multistep import DEFAULT_HEAD_ERROR, genie_multistep, head_weight
from .genie_multistep import _genie_multistep_weights, _moment_weights  # noqa: F401  (tests)
from .jvp import exact_deps, jvp
from .multistep import _exp_integrals  # noqa: F401  (tests)
from .multistep import dpmpp_2m, dpmpp_3m, ipndm, unipc
from .options import AUTO_AFS, AUTO_GRID, DEFAULT_AFS, DEFAULT_NFE, DEFAULT_SOLVER, Options, grid_for, resolve
from .plan import Plan, check_grid
from .runge_kutta import dpm_solver_2, heun
from .taylor import ddim, genie, genie_exact

__all__ = ["SOLVERS", "NFE_PER_STEP", "JVP_NFE", "nfe_of", "steps_for_nfe", "evals_per_call",
           "Plan", "check_grid", "jvp", "exact_deps", "NonFiniteError", "find_nonfinite",
           "DEFAULT_SOLVER", "DEFAULT_NFE", "DEFAULT_AFS", "AUTO_GRID", "AUTO_AFS", "grid_for",
           "ddim", "genie", "genie_exact", "heun", "dpm_solver_2", "dpmpp_2m", "dpmpp_3m",
           "unipc", "ipndm", "genie_multistep", "head_weight", "DEFAULT_HEAD_ERROR", "HEAD_SOLVERS",
           "resolve", "Options"]

# The registry (declared in accounting.py, which reads it): every solver by name, in this order.
SOLVERS.update({
    "ddim": ddim,
    "genie": genie,
    "genie_exact": genie_exact,
    "heun": heun,
    "dpm_solver_2": dpm_solver_2,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_3m": dpmpp_3m,
    "unipc": unipc,
    "ipndm": ipndm,
    "genie_multistep": genie_multistep,
})
# The solvers that read d eps / d gamma from a head (head= or the model's eps_and_head / eps_and_deps).
HEAD_SOLVERS = ("genie", "genie_multistep")
NFE_PER_STEP.update({name: 1 for name in SOLVERS} | {"heun": 2, "dpm_solver_2": 2, "genie_exact": 1 + JVP_NFE})
