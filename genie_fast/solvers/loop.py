"""The preamble, bookkeeping and ending every solver shares (`_StepLoop`)."""
from __future__ import annotations

import sys

import torch

from .. import ops
from ..schedule import COL
from .accounting import JVP_NFE, evals_per_call
from .finite import _FIND_NONFINITE, NonFiniteError, _output
from .jvp import _jvp_along_ode
from .plan import Plan

# The NVTX ranges go through the package's `push` / `pop`, looked up at each call, so replacing
# genie_fast.solvers.push / .pop (tests/test_engine.py records the ranges so) reaches every solver.
_package = sys.modules[__package__]


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
            _package.push("step")
            self.n = n
            try:
                yield n
            finally:
                _package.pop()

    def call(self, fn, x, t_net):
        """fn(x in net_dtype, t_net) (t_net: (B,) network times from the plan); counts its NFE."""
        if x.dtype != self.net_dtype:
            x = x.to(self.net_dtype)
        _package.push("network")
        try:
            out = fn(x, t_net)
        finally:
            _package.pop()
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
        _package.push("network")
        try:
            deps = _jvp_along_ode(self.model, x, self.plan.t[n], dx, dt_dgamma[n], self.schedule)
        finally:
            _package.pop()
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
            _package.push("step")
            try:
                eps = self.call(self.model, x, self.plan.t_net[-1])
                out = ops.denoise_step(x_bar, eps, self.rows[-1], backend=self.backend)
            finally:
                _package.pop()
        elif x.dtype == self.state_dtype:
            out = x
        else:  # x_N went to the network's dtype: the sample is taken from the state instead
            out = self.x_next(x_bar, self.num_steps - 1)
        if _FIND_NONFINITE.get() and not bool(torch.isfinite(out).all()):
            k = self.num_steps - 1 if self.last_finite_step is None else self.last_finite_step
            raise NonFiniteError(f"the ODE state stopped being finite in the update of {self._interval(k)}, "
                                 f"after finite network outputs")
        return out.to(self.x_T.dtype), self.nfe
