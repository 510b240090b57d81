"""Noise schedules of the VP diffusion, time grids and per-step coefficient tables.

The VP forward process is x_t = alpha_t x_0 + sigma_t eps with alpha_t^2 + sigma_t^2 = 1.
Everything GENIE needs follows from log alpha_t:

    gamma_t = sigma_t / alpha_t          (the DDIM ODE's time variable)
    x_bar   = x * sqrt(1 + gamma^2)      (the DDIM ODE's state, d x_bar / d gamma = eps)
    logSNR  = 2 log(alpha / sigma) = -2 log gamma

A schedule object owns these formulas; solvers and kernels never re-derive them.
All methods accept a python float or a tensor (any dtype, any device) and return the
same kind; host-side tables are computed in float64.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "VPSchedule",
    "DiscreteVPSchedule",
    "time_grid",
    "coeff_table",
    "check_schedule",
    "COEFF_COLUMNS",
    "GRIDS",
    "q_sample",
    "ode_tangents",
]


def _as_tensor(t):
    if isinstance(t, torch.Tensor):
        return t, False
    return torch.tensor(float(t), dtype=torch.float64), True


def _unwrap(value: torch.Tensor, was_float: bool):
    return float(value) if was_float else value


class _Schedule:
    """Shared VP formulas on top of `_log_alpha`, `_t_of_log_alpha` and `_dlog_alpha_dt`."""

    t_end: float
    t_start: float = 1.0

    # subclasses implement these three on tensors
    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dlog_alpha_dt(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _t_of_log_alpha(self, log_alpha: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def log_alpha(self, t):
        t, f = _as_tensor(t)
        return _unwrap(self._log_alpha(t), f)

    def alpha(self, t):
        t, f = _as_tensor(t)
        return _unwrap(torch.exp(self._log_alpha(t)), f)

    def sigma(self, t):
        t, f = _as_tensor(t)
        # sqrt(1 - alpha^2) = sqrt(-expm1(2 log alpha)), accurate for t -> 0
        return _unwrap(torch.sqrt(-torch.expm1(2.0 * self._log_alpha(t))), f)

    def gamma(self, t):
        t, f = _as_tensor(t)
        # gamma^2 = 1/alpha^2 - 1 = expm1(-2 log alpha)
        return _unwrap(torch.sqrt(torch.expm1(-2.0 * self._log_alpha(t))), f)

    def log_snr(self, t):
        t, f = _as_tensor(t)
        return _unwrap(-torch.log(torch.expm1(-2.0 * self._log_alpha(t))), f)

    def t_of_gamma(self, gamma):
        g, f = _as_tensor(gamma)
        # 1 + gamma^2 = 1 / alpha^2  ->  log alpha = -log1p(gamma^2) / 2
        return _unwrap(self._t_of_log_alpha(-0.5 * torch.log1p(g * g)), f)

    def t_of_log_snr(self, lam):
        lam, f = _as_tensor(lam)
        # gamma^2 = exp(-lam)
        return _unwrap(self._t_of_log_alpha(-0.5 * torch.log1p(torch.exp(-lam))), f)

    def dt_dgamma(self, gamma):
        """dt/dgamma at gamma, from d log alpha / dt and gamma = sqrt(exp(-2 log alpha) - 1)."""
        g, f = _as_tensor(gamma)
        t = self._t_of_log_alpha(-0.5 * torch.log1p(g * g))
        # dgamma/dt = -(1 + gamma^2) / gamma * dlog_alpha/dt
        dgamma_dt = -(1.0 + g * g) / g * self._dlog_alpha_dt(t)
        return _unwrap(1.0 / dgamma_dt, f)

    def model_time(self, t):
        """The time an eps model receives: continuous t in [t_end, 1] for every schedule here."""
        return t


class VPSchedule(_Schedule):
    """Continuous VP schedule with linear beta(t) = beta_min + beta_d * t (ScoreSDE, GENIE).

    log alpha_t = -(beta_min t + beta_d t^2 / 2) / 2, closed-form inverse and dt/dgamma.
    """

    def __init__(self, beta_min: float = 0.1, beta_d: float = 19.9, t_end: float = 1e-3):
        if beta_min < 0 or beta_d <= 0:
            raise ValueError(f"VPSchedule needs beta_min >= 0 and beta_d > 0, got {beta_min}, {beta_d}")
        if not 0.0 < t_end < 1.0:
            raise ValueError(f"t_end must lie in (0, 1), got {t_end}")
        self.beta_min, self.beta_d, self.t_end = float(beta_min), float(beta_d), float(t_end)

    def __repr__(self):
        return f"VPSchedule(beta_min={self.beta_min}, beta_d={self.beta_d}, t_end={self.t_end})"

    def _log_alpha(self, t):
        return -0.5 * (self.beta_min * t + 0.5 * self.beta_d * t * t)

    def _dlog_alpha_dt(self, t):
        return -0.5 * (self.beta_min + self.beta_d * t)

    def _t_of_log_alpha(self, log_alpha):
        # solve beta_d/2 t^2 + beta_min t + 2 log alpha = 0 for t >= 0
        disc = self.beta_min**2 - 4.0 * self.beta_d * log_alpha
        return (-self.beta_min + torch.sqrt(disc)) / self.beta_d

    def dt_dgamma(self, gamma):
        """Closed form: 2 gamma / ((1 + gamma^2) sqrt(beta_min^2 + 2 beta_d log(1 + gamma^2)))."""
        g, f = _as_tensor(gamma)
        root = torch.sqrt(self.beta_min**2 + 2.0 * self.beta_d * torch.log1p(g * g))
        return _unwrap(2.0 * g / ((1.0 + g * g) * root), f)


class DiscreteVPSchedule(_Schedule):
    """A DDPM schedule of N discrete steps (ADM, diffusers) seen in continuous time.

    Step n (0-based) has alpha_bar_n = prod_{i<=n} (1 - beta_i) and sits at t_n = (n + 1) / N;
    log alpha_t = log(alpha_bar) / 2 is interpolated linearly in t between the steps, so the
    same solvers run on it. `model_time(t)` maps back to the network's (fractional) step index.
    """

    def __init__(self, betas, t_end: float | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError("betas must be a 1-D sequence of at least two values")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("every beta must lie in (0, 1)")
        self.betas = betas
        self.num_steps = n = len(betas)
        self._ts = torch.arange(1, n + 1, dtype=torch.float64) / n
        self._log_alphas = 0.5 * torch.cumsum(torch.log1p(-betas), 0)
        if not bool((self._log_alphas[1:] < self._log_alphas[:-1]).all()):
            raise ValueError("alpha_bar must decrease strictly with the step index")
        self.t_end = float(self._ts[0]) if t_end is None else float(t_end)
        if not self._ts[0] <= self.t_end < 1.0:
            raise ValueError(f"t_end must lie in [1/N, 1) = [{float(self._ts[0])}, 1), got {self.t_end}")

    @classmethod
    def linear(cls, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, **kw):
        """DDPM's linear betas (Ho et al. 2020), scaled to num_steps as ADM does."""
        scale = 1000.0 / num_steps
        return cls(torch.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=torch.float64), **kw)

    @classmethod
    def cosine(cls, num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999, **kw):
        """Improved DDPM's cosine schedule (Nichol & Dhariwal 2021), betas clipped at max_beta."""
        i = torch.arange(num_steps + 1, dtype=torch.float64)
        f = torch.cos((i / num_steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = torch.clamp(1.0 - f[1:] / f[:-1], max=max_beta)
        return cls(betas, **kw)

    def __repr__(self):
        return f"DiscreteVPSchedule(num_steps={self.num_steps}, t_end={self.t_end})"

    def _table(self, like):
        return self._ts.to(like.device, like.dtype), self._log_alphas.to(like.device, like.dtype)

    def _segment(self, t, ts):
        idx = torch.searchsorted(ts, t.detach().contiguous(), right=True) - 1
        return idx.clamp(0, len(ts) - 2)

    def _log_alpha(self, t):
        ts, la = self._table(t)
        i = self._segment(t, ts)
        w = (t - ts[i]) / (ts[i + 1] - ts[i])
        return la[i] + w * (la[i + 1] - la[i])

    def _dlog_alpha_dt(self, t):
        ts, la = self._table(t)
        i = self._segment(t, ts)
        return (la[i + 1] - la[i]) / (ts[i + 1] - ts[i])

    def _t_of_log_alpha(self, log_alpha):
        ts, la = self._table(log_alpha)
        # la decreases; search on -la, which increases
        i = (torch.searchsorted(-la, -log_alpha.detach().contiguous(), right=True) - 1).clamp(0, len(ts) - 2)
        w = (log_alpha - la[i]) / (la[i + 1] - la[i])
        return ts[i] + w * (ts[i + 1] - ts[i])

    def model_time(self, t):
        """Fractional step index n = t * N - 1 that a discrete-time network expects."""
        return t * self.num_steps - 1.0


GRIDS = ("uniform", "quadratic", "logsnr", "edm")


def time_grid(schedule: _Schedule, num_steps: int, kind="quadratic", t_start: float = 1.0,
              t_end: float | None = None, rho: float = 7.0) -> torch.Tensor:
    """float64 times t_0 = t_start, ..., t_N = t_end (num_steps + 1 points), strictly monotone.

    Sampling runs from t_start = 1 down to t_end = schedule.t_end (the defaults); swapping them
    (t_start = schedule.t_end, t_end = 1) gives the same grid increasing, for encoding.
    kind: "uniform" in t, "quadratic" (uniform in sqrt t: GENIE's quadratic striding),
    "logsnr" (uniform in logSNR), "edm" (Karras et al. polynomial in gamma with exponent rho,
    gamma being EDM's sigma), or a user-given 1-D sequence of times, which is validated
    (strictly monotone, in (0, 1]) and returned as is.
    """
    if not isinstance(kind, str):
        ts = torch.as_tensor(kind, dtype=torch.float64).flatten()
        if len(ts) < 2:
            raise ValueError("a user-given time grid needs at least two times")
        if not bool(torch.isfinite(ts).all()):
            i = int((~torch.isfinite(ts)).nonzero()[0])
            raise ValueError(f"a user-given time grid must hold finite times, got {float(ts[i])} at index {i}")
        d = ts[1:] - ts[:-1]
        if not (bool((d < 0).all()) or bool((d > 0).all())):
            raise ValueError("a user-given time grid must be strictly monotone (decreasing for sampling, "
                             "from t=1 to t_end)")
        if not (ts.min() > 0 and ts.max() <= 1):
            raise ValueError(f"a user-given time grid must lie in (0, 1], got [{float(ts.min())}, {float(ts.max())}]")
        return ts
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps}")
    t_end = schedule.t_end if t_end is None else float(t_end)
    if not (0.0 < min(t_start, t_end) and max(t_start, t_end) <= 1.0 and t_start != t_end):
        raise ValueError(f"need t_start != t_end, both in (0, 1], got t_start={t_start}, t_end={t_end}")
    u = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
    if kind == "uniform":
        ts = t_start + u * (t_end - t_start)
    elif kind == "quadratic":
        ts = (math.sqrt(t_start) + u * (math.sqrt(t_end) - math.sqrt(t_start))) ** 2
    elif kind == "logsnr":
        l0, l1 = schedule.log_snr(t_start), schedule.log_snr(t_end)
        ts = schedule.t_of_log_snr(l0 + u * (l1 - l0))
    elif kind == "edm":
        g0, g1 = schedule.gamma(t_start) ** (1 / rho), schedule.gamma(t_end) ** (1 / rho)
        ts = schedule.t_of_gamma((g0 + u * (g1 - g0)) ** rho)
    else:
        raise ValueError(f"unknown time grid {kind!r}; choose one of {GRIDS} or pass the times")
    ts[0], ts[-1] = t_start, t_end  # exact end points despite round-off in the inverses
    return ts


# Columns of the per-step coefficient table: row n describes the step t_n -> t_{n+1}.
COEFF_COLUMNS = (
    "t",           # t_n
    "t_next",      # t_{n+1}
    "gamma",       # gamma_n
    "gamma_next",  # gamma_{n+1}
    "h",           # gamma_{n+1} - gamma_n (negative when sampling, positive when encoding)
    "half_h2",     # h^2 / 2, the Taylor coefficient of d eps / d gamma
    "w1",          # head weight of h1: -1 / gamma_n
    "w2",          # head weight of h2: gamma_n / (1 + gamma_n^2)
    "w3",          # head weight of h3: 1 / (gamma_n (1 + gamma_n^2))
    "scale",       # sqrt(1 + gamma_n^2) = 1 / alpha_n   (x_bar = x * scale)
    "inv_scale_next",  # 1 / sqrt(1 + gamma_{n+1}^2) = alpha_{n+1}  (x = x_bar * inv_scale_next)
    "dpm_r",       # r = gamma_{n+1} / gamma_n = exp(-h_lambda): the decay of x_bar over the step in
                   # log-SNR (exponential integrators: DPM-Solver++, x_bar_next = r x_bar + ...)
)
# A solver's own weights (e.g. DPM-Solver++(2M)'s a, b from consecutive log-SNR step sizes) are not
# columns: the solver computes them into its plan and passes them beside the row (genie_fast.layout).
COL = {name: i for i, name in enumerate(COEFF_COLUMNS)}


def check_schedule(schedule, name: str = "schedule"):
    """`schedule` itself if it is a schedule object (a `VPSchedule`, `DiscreteVPSchedule`, or
    anything with their ``t_end``, ``gamma``, ``model_time`` and ``log_snr``), else a TypeError naming it."""
    if isinstance(schedule, _Schedule) or all(hasattr(schedule, a) for a in ("t_end", "gamma", "model_time", "log_snr")):
        return schedule
    raise TypeError(f"{name} must be a schedule object (e.g. genie_fast.schedule.VPSchedule(), or the model's "
                    f".schedule), got {schedule!r} ({type(schedule).__name__})")


def coeff_table(schedule: _Schedule, ts) -> torch.Tensor:
    """(N, len(COEFF_COLUMNS)) float64 table for the N steps of the grid ts (N + 1 times).

    Computed once on the host; fused step kernels read row n by step index.
    """
    ts = torch.as_tensor(ts, dtype=torch.float64).cpu()
    g = schedule.gamma(ts)
    t, t_next, gam, gam_next = ts[:-1], ts[1:], g[:-1], g[1:]
    h = gam_next - gam
    one_g2 = 1.0 + gam * gam
    cols = [t, t_next, gam, gam_next, h, 0.5 * h * h, -1.0 / gam, gam / one_g2,
            1.0 / (gam * one_g2), torch.sqrt(one_g2), torch.rsqrt(1.0 + gam_next * gam_next),
            gam_next / gam]
    return torch.stack(cols, dim=1)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) per-sample values shaped (B, 1, ..., 1) to broadcast against ``like`` (B, C, ...)."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def q_sample(x0: torch.Tensor, schedule: _Schedule, generator: torch.Generator | None = None, t=None):
    """The forward process q(x_t | x_0): (x_t, t, z) with x_t = alpha_t x_0 + sigma_t z, z ~ N(0, I).

    t: (B,) times, or None for t ~ U[t_end, 1] drawn from ``generator`` (drawn before z)."""
    if t is None:
        t = schedule.t_end + (1.0 - schedule.t_end) * torch.rand(x0.shape[0], generator=generator)
    z = torch.randn(x0.shape, generator=generator)
    return _per_sample(schedule.alpha(t), x0) * x0 + _per_sample(schedule.sigma(t), x0) * z, t, z


def ode_tangents(eps: torch.Tensor, x: torch.Tensor, t: torch.Tensor, schedule: _Schedule):
    """(dx/dgamma, dt/dgamma) along the DDIM ODE at (x, t) given eps = eps_theta(x, t): the tangent of
    the one JVP that gives d eps/d gamma (docs/method.md).

    dx/dgamma = eps / sqrt(1 + gamma^2) - x gamma / (1 + gamma^2), computed in t's precision, cast to x's."""
    gamma = schedule.gamma(t)
    g = _per_sample(gamma, x)
    one_g2 = 1.0 + g * g
    dx = (eps / one_g2.sqrt() - x * g / one_g2).to(x.dtype)
    return dx, schedule.dt_dgamma(gamma).to(t.dtype)
