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
"""
from __future__ import annotations

import contextlib
import contextvars
import math

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from . import ops
from .profiling import pop, push
from .schedule import COL, VPSchedule, coeff_table, ode_tangents

__all__ = ["SOLVERS", "NFE_PER_STEP", "JVP_NFE", "nfe_of", "steps_for_nfe", "evals_per_call",
           "Plan", "check_grid", "jvp", "exact_deps", "NonFiniteError", "find_nonfinite",
           "DEFAULT_SOLVER", "DEFAULT_NFE", "DEFAULT_AFS", "AUTO_GRID", "AUTO_AFS", "grid_for",
           "ddim", "genie", "genie_exact", "heun", "dpm_solver_2", "dpmpp_2m", "dpmpp_3m",
           "unipc", "ipndm", "genie_multistep", "head_weight", "DEFAULT_HEAD_ERROR", "HEAD_SOLVERS"]


# --------------------------------------------------------------------------- the device plan

def check_grid(ts) -> torch.Tensor:
    """ts as host float64 (N + 1,), checked: at least two positive, strictly monotone times."""
    ts = torch.as_tensor(ts, dtype=torch.float64).detach().cpu().flatten()
    if len(ts) < 2:
        raise ValueError("ts needs at least two times (one step)")
    if not bool(torch.isfinite(ts).all()):
        raise ValueError(f"ts must hold finite times, got {ts.tolist()}")
    d = ts[1:] - ts[:-1]
    if not (bool((d < 0).all()) or bool((d > 0).all())) or not bool((ts > 0).all()):
        raise ValueError("ts must be positive and strictly monotone (decreasing: sampling, increasing: "
                         f"encoding), got {ts.tolist()}")
    return ts


def _per_sample(values: torch.Tensor, batch: int) -> torch.Tensor:
    """(M,) -> (M, B) contiguous: row n is what the network (or a JVP primal) gets for every sample."""
    return values[:, None].expand(-1, batch).contiguous()


class Plan:
    """The device-side constants of one run, built once per (schedule, ts, batch, device, dtype).

    rows: (N, len(COEFF_COLUMNS)) float64 coefficient table on the device; for a `VPSchedule` on a
        CPU or CUDA device the fused `ops.schedule_table` computes it there from the grid (one
        host-to-device copy of N + 1 times), other schedules copy the host `coeff_table`;
    t, t_net: (N + 1, B) continuous times and network (model) times in the state dtype;
    gammas: host float64 gamma at the grid times, for solver weights computed on the host.
    Solver-specific tables (`table`, `times`, `weights`) are built on their first use and kept:
    a solver's first run fills the plan, later runs only read it (no host-to-device copy), which
    is what makes a run after the first capturable.
    """

    def __init__(self, schedule, ts, batch: int, device, state_dtype=torch.float32, backend: str = "auto"):
        if state_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"the ODE state is float32 or float64, got {state_dtype}")
        self.schedule, self.batch, self.backend = schedule, int(batch), backend
        self.device, self.state_dtype = torch.device(device), state_dtype
        self.ts = check_grid(ts)
        self.num_steps = len(self.ts) - 1
        self.increasing = bool(self.ts[1] > self.ts[0])
        self.gammas = schedule.gamma(self.ts)
        self.rows = self._coefficients(self.ts)
        self.t = self._device(_per_sample(self.ts.to(state_dtype), self.batch))
        self.t_net = self._device(_per_sample(schedule.model_time(self.ts.to(state_dtype)), self.batch))
        self._cache: dict[str, torch.Tensor] = {}

    def _device(self, host: torch.Tensor, dtype=None) -> torch.Tensor:
        return host.to(self.device, dtype or host.dtype)

    def _coefficients(self, ts: torch.Tensor) -> torch.Tensor:
        if type(self.schedule) is VPSchedule and self.device.type in ("cpu", "cuda"):
            return ops.schedule_table(self.schedule, ts.to(self.device), backend=self.backend)
        return coeff_table(self.schedule, ts).to(self.device)

    def _cached(self, name, build):
        value = self._cache.get(name)
        if value is None:
            value = self._cache[name] = build()
        return value

    def table(self, name: str, times) -> torch.Tensor:
        """The coefficient table of another grid, times() -> host times (e.g. half steps), on the device."""
        return self._cached(name, lambda: self._coefficients(check_grid(times())))

    def times(self, name: str, times) -> torch.Tensor:
        """(M, B) network times of times() -> host float64 times, in the state dtype, on the device."""
        return self._cached(name, lambda: self._device(_per_sample(
            self.schedule.model_time(torch.as_tensor(times(), dtype=torch.float64).to(self.state_dtype)),
            self.batch)))

    def weights(self, name: str, build) -> torch.Tensor:
        """Per-step solver weights: build() -> host float64 values, kept on the device in the state dtype."""
        return self._cached(name, lambda: self._device(torch.as_tensor(build(), dtype=torch.float64),
                                                       self.state_dtype))

    def check(self, x: torch.Tensor, ts, schedule, state_dtype):
        """Refuse a plan built for another run (a wrong plan would silently give wrong samples)."""
        if (self.batch, self.device, self.state_dtype) != (x.shape[0], x.device, state_dtype) \
                or self.schedule is not schedule:
            raise ValueError(f"plan built for batch {self.batch}, {self.device}, {self.state_dtype}, "
                             f"{self.schedule!r}; this run has batch {x.shape[0]}, {x.device}, "
                             f"{state_dtype}, {schedule!r}")
        if ts is not self.ts and not torch.equal(torch.as_tensor(ts, dtype=torch.float64).cpu().flatten(), self.ts):
            raise ValueError("plan built for another time grid")


# --------------------------------------------------------------------------- NFE accounting

# A forward-mode JVP through the network counts as this many network evaluations: its cost measured
# against one forward of the bundled model on the CPU (bench/bench_overhead.py prints the ratio;
# torch forward AD, batch 1 to 64: 3.9 to 4.9 forwards, bench/RESULTS.md "Sampling engine").
JVP_NFE = 4

SOLVERS: dict = {}  # filled below: name -> solver function
# Network evaluations per step; genie_exact: eps (1) + its JVP (JVP_NFE).
NFE_PER_STEP: dict = {}


def evals_per_call(model) -> int:
    """Network evaluations one call of `model` costs per sample (its ``evals_per_call``, default 1)."""
    k = getattr(model, "evals_per_call", 1)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"evals_per_call must be a positive int, got {k!r}")
    return k


def _check_solver(solver: str):
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


# --------------------------------------------------------------------------- JVPs

class _ContiguousNormTangents(TorchFunctionMode):
    """group_norm's forward-mode derivative views its tangent and fails on a non-contiguous one
    ("view size is not compatible ..."), which the transposes of attention blocks produce (e.g.
    diffusers' UNet2DModel); inside this mode such an input is copied to a contiguous one first
    (primal and tangent: a dual's tangent keeps its primal's layout)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if (func is F.group_norm or func is torch.group_norm) and args:
            tangent = fwAD.unpack_dual(args[0]).tangent
            if tangent is not None and not tangent.is_contiguous():
                args = (args[0].clone(memory_format=torch.contiguous_format), *args[1:])
        return func(*args, **(kwargs or {}))


def jvp(fn, primals: tuple, tangents: tuple):
    """(fn(*primals), the derivative of fn along tangents) by forward-mode AD (dual numbers).

    Runs through attention and GroupNorm, which PyTorch's forward AD does not cover by default:
    4-D ``scaled_dot_product_attention`` dispatches to fused kernels (CPU flash, CUDA flash and
    memory-efficient) without a forward-mode derivative, so inside the JVP the math backend (plain
    matmul + softmax, which have one) is forced; group_norm's forward derivative needs a contiguous
    tangent (`_ContiguousNormTangents`). Inference mode would silently drop the tangent, so it is
    switched off inside. Primals must not be expanded (stride-0) views. Checked against central
    finite differences in float64 through the bundled U-Net and a diffusers UNet2DModel with
    attention (tests/test_solvers.py). Cost: about 4 forwards on the CPU (`JVP_NFE`).
    """
    grad = torch.is_grad_enabled()  # leaving inference mode turns grad mode on: keep the caller's
    with torch.inference_mode(False), torch.set_grad_enabled(grad), fwAD.dual_level(), \
            sdpa_kernel([SDPBackend.MATH]), _ContiguousNormTangents():
        out = fn(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents)))
        primal, tangent = fwAD.unpack_dual(out)
        return primal, (torch.zeros_like(primal) if tangent is None else tangent)


def _jvp_along_ode(model, x, t, dx, dt, schedule):
    _, deps = jvp(lambda x_, t_: model(x_, schedule.model_time(t_)), (x, t), (dx, dt))
    return deps


def exact_deps(model, x, t, eps, schedule):
    """d eps / d gamma along the ODE at (x, t) by one forward-mode JVP (GENIE sec. 3.1).

    x: (B, C, ...) network input at the continuous times t (B,); eps = model(x, model_time(t)).
    The tangent (dx/dgamma, dt/dgamma) is `schedule.ode_tangents`.
    (Inside `genie_exact` the same JVP takes these coefficients from the plan instead.)
    """
    t = t.contiguous()
    dx, dt = ode_tangents(eps, x, t, schedule)
    return _jvp_along_ode(model, x, t, dx, dt, schedule)


# --------------------------------------------------------------------------- checks

class NonFiniteError(FloatingPointError):
    """Samples (or latents), or the ODE state on the way to them, hold NaN or inf."""


_FIND_NONFINITE = contextvars.ContextVar("genie_fast_find_nonfinite", default=False)


@contextlib.contextmanager
def find_nonfinite():
    """Inside, every network call of a solver checks its input and outputs and raises
    `NonFiniteError` naming the first step where the state or the model's output stopped being
    finite. Each check syncs host and device: for a diagnostic re-run only (`SamplingEngine` re-runs
    a call whose result is not finite this way), never in a captured graph."""
    token = _FIND_NONFINITE.set(True)
    try:
        yield
    finally:
        _FIND_NONFINITE.reset(token)


def _output(out, x, what: str, channels: int = 1) -> torch.Tensor:
    """A network output must be a tensor of the input's shape (channels x C for a raw head output):
    no None, and no shape that the step math would broadcast. Host-side shapes only: no sync."""
    want = (x.shape[0], channels * x.shape[1], *x.shape[2:])
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{what} returned {type(out).__name__}, not a tensor of shape {want}")
    if tuple(out.shape) != want:
        raise ValueError(f"{what} returned shape {tuple(out.shape)} for an input of shape {tuple(x.shape)}; "
                         f"it must be {want} (no broadcasting)")
    return out


def _pair(out, what: str):
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError(f"{what} must return a pair (eps, ...), got {type(out).__name__}")
    return out


# --------------------------------------------------------------------------- shared preamble

class _StepLoop:
    """What every solver sets up around its loop, factored once.

    Validates the inputs, takes (or builds) the plan, builds x_bar_0, counts network evaluations
    (a python int: no sync), converts the network input to net_dtype, emits the NVTX ranges
    (``step`` per step, ``network`` per evaluation) and implements AFS and the final denoising.
    """

    def __init__(self, model, x, ts, schedule, afs, denoise, backend, net_dtype, plan):
        if not callable(model):
            raise TypeError(f"model must be a callable eps(x, t), got {type(model).__name__}")
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
            raise ValueError("x must be a floating-point tensor of shape (B, C, ...), got "
                             + (f"shape {tuple(x.shape)} dtype {x.dtype}" if isinstance(x, torch.Tensor)
                                else type(x).__name__))
        if backend not in ops.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {ops.BACKENDS}")
        self.state_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if plan is None:
            plan = Plan(schedule, ts, x.shape[0], x.device, self.state_dtype, backend)
        else:
            plan.check(x, ts, schedule, self.state_dtype)
        if plan.increasing and (afs or denoise):
            raise ValueError("afs and denoise belong to sampling (a decreasing grid from t = 1); "
                             "this grid increases (encoding)")
        self.model, self.schedule, self.plan, self.backend = model, schedule, plan, backend
        self.afs, self.denoise = bool(afs), bool(denoise)
        self.rows, self.num_steps = plan.rows, plan.num_steps
        self.net_dtype = x.dtype if net_dtype is None else net_dtype
        self.evals = evals_per_call(model)
        self.nfe = 0
        self.x_T = x
        self.n, self.last_finite_step = 0, None  # the current step; the step of the last checked call
        self.x_bar = x.to(self.state_dtype) * self.rows[0, COL["scale"]].to(self.state_dtype)

    def steps(self):
        """range(N), each step inside an NVTX ``step`` range."""
        for n in range(self.num_steps):
            push("step")
            self.n = n
            try:
                yield n
            finally:
                pop()

    def call(self, fn, x, t_net):
        """fn(x in net_dtype, t_net) (t_net: (B,) network times from the plan); counts its NFE."""
        if x.dtype != self.net_dtype:
            x = x.to(self.net_dtype)
        push("network")
        try:
            out = fn(x, t_net)
        finally:
            pop()
        self.nfe += self.evals
        if fn is self.model:
            _output(out, x, "the model")
        if _FIND_NONFINITE.get():
            self._check_finite(x, out if isinstance(out, torch.Tensor) else out[0],
                               None if isinstance(out, torch.Tensor) else out[1])
        return out

    def _interval(self, n) -> str:
        return f"step {n} of {self.num_steps} (t {float(self.plan.ts[n]):.4g} -> {float(self.plan.ts[n + 1]):.4g})"

    def _check_finite(self, x, eps, extra=None, what="the model"):
        """Under `find_nonfinite`: name where the state or a network output stopped being finite."""
        if not bool(torch.isfinite(x).all()):
            k = self.last_finite_step if self.last_finite_step is not None else 0
            raise NonFiniteError(f"the ODE state stopped being finite in the update of {self._interval(k)}, "
                                 f"after finite network outputs")
        if not bool(torch.isfinite(eps).all()):
            raise NonFiniteError(f"{what} returned non-finite eps at {self._interval(self.n)} from a finite input")
        if extra is not None and not bool(torch.isfinite(extra).all()):
            raise NonFiniteError(f"{what} returned non-finite d eps/d gamma (head output) at "
                                 f"{self._interval(self.n)} from a finite input")
        self.last_finite_step = self.n

    def eps(self, x, n):
        """eps at grid time t_n; with AFS the evaluation at (x_T, t_0) is x_T itself, 0 NFE."""
        if n == 0 and self.afs:
            return self.x_T
        return self.call(self.model, x, self.plan.t_net[n])

    def afs_step(self, n) -> bool:
        """True when step n is the analytical first step (a DDIM step with eps = x_T, deps = 0)."""
        return n == 0 and self.afs

    def exact_deps(self, x, eps, n, dt_dgamma):
        """d eps/d gamma at grid point n by a JVP, tangent coefficients from the plan (JVP_NFE NFE)."""
        c = self.rows[n].to(self.state_dtype)
        if x.dtype != self.net_dtype:
            x = x.to(self.net_dtype)
        # dx/dgamma = eps / sqrt(1 + gamma^2) - x gamma / (1 + gamma^2);  dt/dgamma from the plan
        dx = (eps.to(self.state_dtype) / c[COL["scale"]] - x.to(self.state_dtype) * c[COL["w2"]]).to(x.dtype)
        push("network")
        try:
            deps = _jvp_along_ode(self.model, x, self.plan.t[n], dx, dt_dgamma[n], self.schedule)
        finally:
            pop()
        self.nfe += JVP_NFE * self.evals
        if _FIND_NONFINITE.get():
            self._check_finite(x, eps, deps, "the model's JVP")
        return deps

    def x0_pred(self, x_bar, eps, n):
        """Data prediction x0 = x_bar - gamma_n eps at grid point n (state dtype)."""
        return x_bar - self.rows[n, COL["gamma"]].to(self.state_dtype) * eps.to(self.state_dtype)

    def x_next(self, x_bar_next, n):
        """The network input at t_{n+1} from x_bar_{n+1} (state dtype; `call` converts it)."""
        return x_bar_next * self.rows[n, COL["inv_scale_next"]].to(self.state_dtype)

    def finish(self, x_bar, x):
        """Final denoising (x0 = x_bar_N - gamma_N eps(x_N, t_N), +1 NFE) or x_N, in x_T's dtype."""
        if self.denoise:
            push("step")
            try:
                eps = self.call(self.model, x, self.plan.t_net[-1])
                out = ops.denoise_step(x_bar, eps, self.rows[-1], backend=self.backend)
            finally:
                pop()
        elif x.dtype == self.state_dtype:
            out = x
        else:  # x_N went to the network's dtype: the sample is taken from the state instead
            out = self.x_next(x_bar, self.num_steps - 1)
        if _FIND_NONFINITE.get() and not bool(torch.isfinite(out).all()):
            k = self.num_steps - 1 if self.last_finite_step is None else self.last_finite_step
            raise NonFiniteError(f"the ODE state stopped being finite in the update of {self._interval(k)}, "
                                 f"after finite network outputs")
        return out.to(self.x_T.dtype), self.nfe


# --------------------------------------------------------------------------- Taylor solvers

def ddim(model, x, ts, schedule, *, afs=False, denoise=False, backend="auto", net_dtype=None, plan=None):
    """DDIM (Song et al. 2021) = Euler in gamma on d x_bar / d gamma = eps. 1 NFE per step."""
    run = _StepLoop(model, x, ts, schedule, afs, denoise, backend, net_dtype, plan)
    x_bar, x_n = run.x_bar, x
    for n in run.steps():
        eps = run.eps(x_n, n)
        # x_bar_{n+1} = x_bar_n + h eps_n
        x_bar, x_n = ops.ddim_step(x_bar, eps, run.rows[n], backend=backend)
    return run.finish(x_bar, x_n)


def _genie_eval(model, head, solver="genie"):
    """Picks how `genie` (or another solver of HEAD_SOLVERS) gets (eps, d eps/d gamma information)
    from the model, once: returns (evaluate(x, t) -> (eps, out), kind), kind "raw_head" when out is
    the head's raw [h1|h2|h3] (combined inside the fused step op), "deps" when out is d eps/d gamma."""
    if head is not None:
        if not callable(head):
            raise TypeError(f"head must be a callable head(x, t, eps) -> deps, got {type(head).__name__}")

        def with_head(x, t):  # every output checked: a head returning None would make GENIE silently DDIM
            eps = _output(model(x, t), x, "the model")
            return eps, _output(head(x, t, eps), x, "head=")
        return with_head, "deps"
    if callable(getattr(model, "eps_and_head", None)):
        def eps_and_head(x, t):
            eps, head_out = _pair(model.eps_and_head(x, t), "model.eps_and_head")
            return (_output(eps, x, "model.eps_and_head (its eps)"),
                    _output(head_out, x, "model.eps_and_head (its head output [h1|h2|h3])", channels=3))
        return eps_and_head, "raw_head"
    if callable(getattr(model, "eps_and_deps", None)):
        def eps_and_deps(x, t):
            eps, deps = _pair(model.eps_and_deps(x, t), "model.eps_and_deps")
            return _output(eps, x, "model.eps_and_deps (its eps)"), _output(deps, x, "model.eps_and_deps (its deps)")
        return eps_and_deps, "deps"
    raise TypeError(
        f"{solver} needs d eps/d gamma: give a model with eps_and_head(x, t) (a distilled GENIE head) "
        "or eps_and_deps(x, t), or pass head=callable(x, t, eps) -> deps; "
        "for exact derivatives by autodiff use solver 'genie_exact'")


def genie(model, x, ts, schedule, *, afs=False, denoise=False, backend="auto", net_dtype=None, plan=None,
          head=None):
    """GENIE (Dockhorn et al. 2022, eq. 9): second-order truncated Taylor step in gamma,

        x_bar_{n+1} = x_bar_n + h eps_n + h^2 / 2 * (d eps / d gamma)_n,

    with d eps/d gamma from the distilled head: model.eps_and_head (raw [h1|h2|h3], combined in
    the fused op), model.eps_and_deps, or head(x, t, eps) -> deps (t: the model time the network
    received, eps: its output). 1 NFE per step (the paper's accounting: the head counts as part
    of the evaluation).
    """
    evaluate, kind = _genie_eval(model, head)
    run = _StepLoop(model, x, ts, schedule, afs, denoise, backend, net_dtype, plan)
    x_bar, x_n = run.x_bar, x
    for n in run.steps():
        row = run.rows[n]
        if run.afs_step(n):  # eps = x_T, deps = 0: a DDIM step
            x_bar, x_n = ops.ddim_step(x_bar, run.x_T, row, backend=backend)
            continue
        eps, d = run.call(evaluate, x_n, run.plan.t_net[n])
        if kind == "raw_head":
            x_bar, x_n = ops.genie_step(x_bar, eps, d, row, backend=backend)
        else:
            x_bar, x_n = ops.taylor_step(x_bar, eps, d, row, backend=backend)
    return run.finish(x_bar, x_n)


def genie_exact(model, x, ts, schedule, *, afs=False, denoise=False, backend="auto", net_dtype=None, plan=None):
    """GENIE's Taylor step with d eps/d gamma from forward-mode autodiff (the head's teacher).

    1 + JVP_NFE NFE per step: eps and a JVP through the network (`jvp`). With AFS the first step
    (a DDIM step with eps = x_T) costs nothing.
    """
    run = _StepLoop(model, x, ts, schedule, afs, denoise, backend, net_dtype, plan)
    dt_dgamma = run.plan.weights("dt_dgamma", lambda: _per_sample(
        schedule.dt_dgamma(run.plan.gammas[:-1]), run.plan.batch))
    x_bar, x_n = run.x_bar, x
    for n in run.steps():
        row = run.rows[n]
        if run.afs_step(n):
            x_bar, x_n = ops.ddim_step(x_bar, run.x_T, row, backend=backend)
            continue
        eps = run.eps(x_n, n)
        deps = run.exact_deps(x_n, eps, n, dt_dgamma)
        x_bar, x_n = ops.taylor_step(x_bar, eps, deps, row, backend=backend)
    return run.finish(x_bar, x_n)


# --------------------------------------------------------------------------- Runge-Kutta solvers

def heun(model, x, ts, schedule, *, afs=False, denoise=False, backend="auto", net_dtype=None, plan=None):
    """Heun's method in gamma (Karras et al. 2022, Alg. 1, on the DDIM ODE). 2 NFE per step.

    x_bar' = x_bar_n + h eps_n;  x_bar_{n+1} = x_bar_n + h (eps_n + eps(x', t_{n+1})) / 2.
    """
    run = _StepLoop(model, x, ts, schedule, afs, denoise, backend, net_dtype, plan)
    x_bar, x_n = run.x_bar, x
    for n in run.steps():
        row = run.rows[n]
        eps = run.eps(x_n, n)
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
        _, u = ops.ddim_step(x_bar, eps, half[2 * n], backend=backend)
        eps_mid = run.call(model, u, t_mid_net[n])
        x_bar, x_n = ops.ddim_step(x_bar, eps_mid, run.rows[n], backend=backend)
    return run.finish(x_bar, x_n)


# --------------------------------------------------------------------------- multistep solvers

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


def _first_order_row(row: torch.Tensor) -> torch.Tensor:
    """A coefficient-table row whose DPM-Solver++(2M) weights make the step first order (a = 1, b = 0:
    x_bar_next = r x_bar + (1 - r) x0, DDIM). Built on the row's device once per plan."""
    row = row.clone()
    row[COL["dpm_a"]] = 1.0
    row[COL["dpm_b"]] = 0.0
    return row


def dpmpp_2m(model, x, ts, schedule, *, afs=False, denoise=False, backend="auto", net_dtype=None, plan=None,
             lower_order_final=False):
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2), data prediction, 1 NFE per step.

    x_bar_{n+1} = r x_bar_n + (1 - r) (a x0_n + b x0_{n-1}); the first step is DDIM (b = 0). This is
    the 'dpmsolver' form of the second-order multistep update (diffusers: solver_type="midpoint"),
    I_0 x0_n + (I_0 / 2) D1_0 with D1_0 = (x0_n - x0_{n-1}) / r0 (see `dpmpp_3m`).
    lower_order_final: False (default, order 2 on every step but the first); True, the DPM-Solver
    authors' rule: with fewer than 10 steps the last step is first order (DDIM, a = 1, b = 0);
    "diffusers", DPMSolverMultistepScheduler's: the same below 15 steps (see `dpmpp_3m` for both
    rules). Off by default, as before: on an 8-mode exact-score mixture (logSNR grid, bench/RESULTS.md,
    issue 15) lowering cut the error by 5-21% where it applies and never raised it, but on one toy
    problem and not on dpmpp_2m's own grid ("edm", `AUTO_GRID`); measure on the bundled model first.
    """
    _check_lower_order_final(lower_order_final)
    run = _StepLoop(model, x, ts, schedule, afs, denoise, backend, net_dtype, plan)
    last = run.num_steps - 1
    # the lowered last step reads a row with a = 1, b = 0, kept in the plan (no allocation in the loop)
    last_row = (run.plan._cached("dpmpp_2m_first_order_last", lambda: _first_order_row(run.rows[last]))
                if _lowered(run.num_steps, lower_order_final, "dpm") else run.rows[last])
    x_bar, x_n = run.x_bar, x
    x0_prev = torch.zeros_like(x_bar)
    for n in run.steps():
        eps = run.eps(x_n, n)
        row = last_row if n == last else run.rows[n]
        x_bar, x_n, x0_prev = ops.dpmpp_2m_step(x_bar, eps, x0_prev, row, backend=backend)
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
    Defaults: "consistent" and False, what earlier releases computed. Measured (bench/RESULTS.md,
    "DPM-Solver++ variants and lower_order_final (issue 15)": 8-mode exact-score mixture, logSNR
    grid, AFS, NFE 4-20): "reference" has an 18-34% lower error at every NFE there, but only as the
    lower-order method that is ahead at few steps (the consistent one overtakes it from 64 steps on
    the test mixture); lowering helps 3M at NFE 4, 6 and 8 but doubles its error at NFE 5, so
    neither measurement was a reason to change what the per-solver grids were tuned with.
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
    the order is 2: a first-order last step errs by O(h^2)). Off by default: measured on an 8-mode
    exact-score mixture (logSNR grid, bench/RESULTS.md, issue 15) it lowers the error at NFE 4-20
    (up to 45% at NFE 8), but unipc's own grid ("edm", `AUTO_GRID`) was chosen without it, and one
    toy problem is not a reason to change every earlier result; measure on the bundled model first.
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
            # corrector: the same form with the new point (r = 1) joining the history
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


# genie_multistep: node sets of the predictor and corrector per order, as (value nodes, derivative
# nodes); node j >= 0 is the grid point n - j (n: the step's start), j = -1 the step's end. Each pair
# is (head form, history form): the first uses the head's derivative, the second only data
# predictions; both have the same order, and the step blends them (see `genie_multistep`).
_MULTISTEP_NODES = {
    3: {"predictor": (((0,), (0,)), ((0, 1), ())),
        "corrector": (((0, -1), (-1,)), ((0, 1, -1), ()))},
    4: {"predictor": (((0, 1), (0,)), ((0, 1, 2), ())),
        "corrector": (((0, -1), (0, -1)), ((0, 1, 2, -1), ()))},
}
# Relative error of a distilled head's d eps / d gamma against the exact JVP when the model does not
# declare its own ``head_error``: the bundled model's head, 0.57 pooled (bench/RESULTS.md).
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
    """theta in [0, 1]: the share of the head form in a `genie_multistep` step of size h in lambda.

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
    """theta * head form + (1 - theta) * history form, their nodes cut to the `points` grid points
    computed so far (the first steps lack history: their order is lower); the head form alone
    while the history form would be a single point."""
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
    The blend weight theta = `head_weight(h, head_error)` trusts the head in proportion to how
    good it is against the history's secants (head_error: the head's relative error, from the
    argument, else the model's ``head_error`` attribute, else DEFAULT_HEAD_ERROR; 0 = exact).
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
        head_error = getattr(model, "head_error", DEFAULT_HEAD_ERROR)
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
    for m in run.steps():
        if run.afs_step(m):  # eps = x_T, d eps / d gamma = 0
            eps = run.x_T.to(run.net_dtype)
            head_out = eps.new_zeros((x.shape[0], 3 * x.shape[1], *x.shape[2:]))
        else:
            eps, head_out = run.call(evaluate, x_n, run.plan.t_net[m])
            if kind == "deps":  # pack as a raw head [-gamma deps | 0 | 0]: w1 = -1 / gamma recovers deps
                head_out = torch.cat([-run.rows[m, COL["gamma"]].to(head_out.dtype) * head_out,
                                      torch.zeros_like(head_out), torch.zeros_like(head_out)], dim=1)
        ops.genie_multistep_step(x_bar, x_bar if m == 0 else x_bar_pred, eps, head_out, x0_hist, d_hist,
                                 weights[m], run.rows[m], backend=backend,
                                 out=(x_bar, x_bar_pred, x_pred, x0_hist[m % ops.MULTISTEP_X0_SLOTS],
                                      d_hist[m % ops.MULTISTEP_D_SLOTS]))
        x_n = x_pred
    return run.finish(x_bar_pred, x_pred)


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


# --------------------------------------------------------------------------- defaults

DEFAULT_SOLVER = "genie"
DEFAULT_NFE = 10
# AFS saves the network evaluation at t = 1 for one more step: measured better or equal for every
# solver at 5 and 10 NFE on the bundled model (bench/bench_grids.py), so it is on by default.
DEFAULT_AFS = True
# grid="auto": the grid with the lowest ODE error for each solver on the bundled model at NFE 5, 10
# and 20 with AFS (bench/bench_grids.py; the table is in README.md and bench/RESULTS.md).
AUTO_GRID = {
    "ddim": "uniform",
    "genie": "uniform",
    "genie_exact": "edm",
    "heun": "edm",
    "dpm_solver_2": "edm",
    "dpmpp_2m": "edm",
    "dpmpp_3m": "logsnr",
    "unipc": "edm",
    "ipndm": "uniform",
    "genie_multistep": "edm",  # bench_quality.py on the bundled model (bench/RESULTS.md, issue 15)
}
# afs=None: the solver's entry (as measured, DEFAULT_AFS for every solver).
AUTO_AFS = {name: DEFAULT_AFS for name in SOLVERS}


def grid_for(solver: str, grid="auto"):
    """The grid `grid="auto"` means for `solver` (`AUTO_GRID`; "logsnr" for a solver added later
    without an entry); any other grid is returned as is."""
    _check_solver(solver)
    return AUTO_GRID.get(solver, "logsnr") if isinstance(grid, str) and grid == "auto" else grid
