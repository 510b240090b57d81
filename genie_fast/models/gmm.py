"""An exact-score test problem: Gaussian-mixture data under the VP diffusion.

Data x0 ~ sum_k w_k N(mu_k, diag(s_k^2)) of any image shape. Under x_t = alpha x0 + sigma z the
marginal of component k is N(alpha mu_k, alpha^2 s_k^2 + sigma^2), so the exact eps-prediction
eps*(x, t) = -sigma * grad log p_t(x) has a closed form. In GENIE's coordinates
(x_bar = x / alpha, gamma = sigma / alpha) it reads

    eps*(x, t) = gamma * sum_k p_k(x_bar) (x_bar - mu_k) / (s_k^2 + gamma^2),
    log p_k    = log w_k - 1/2 sum_i [(x_bar - mu_k)_i^2 / c_ki + log c_ki],  c_k = s_k^2 + gamma^2,

with the posterior weights p_k from a log-sum-exp (a softmax), stable for far-away x and small t.

Class-conditional form (``classes=``, one class per component): the exact conditional eps of
class c is the same formula over the components of class c (the other weights set to zero);
label ``num_classes`` (the null class) or ``labels=None`` gives the whole mixture, the exact
unconditional eps. ``eps_and_head`` returns the exact d eps / d gamma along the ODE of the label
given, packed as a raw GENIE head output [h1|h2|h3] = [-gamma deps | 0 | 0] (the head combination
maps it back to deps), so the ``genie`` solver runs on it with an exact head.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..schedule import DiscreteVPSchedule, VPSchedule

__all__ = ["GaussianMixture"]


class GaussianMixture(nn.Module):
    """Exact eps model of a Gaussian mixture; call it as model(x, t) like any eps network.

    means: (K, *shape); stds: (K,) isotropic or (K, *shape) diagonal, all > 0; weights: (K,) >= 0
    (normalised here; default uniform). Buffers are float64; a call computes in x's dtype.
    t is the model time `schedule.model_time(t)` (continuous t for a VPSchedule).
    """

    head_error = 0.0  # eps_and_head is exact: genie_multistep uses its head form alone

    def __init__(self, means, stds, weights=None, schedule=None, classes=None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() < 2:
            raise ValueError(f"means must have shape (K, *image_shape), got {tuple(means.shape)}")
        k, shape = means.shape[0], tuple(means.shape[1:])
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if stds.shape == (k,):
            stds = stds.view(k, *([1] * len(shape))).expand(k, *shape)
        elif tuple(stds.shape) != (k, *shape):
            raise ValueError(f"stds must have shape ({k},) or {(k, *shape)}, got {tuple(stds.shape)}")
        if not bool((stds > 0).all()):
            raise ValueError("every std must be > 0")
        weights = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (k,) or not bool((weights >= 0).all()) or not float(weights.sum()) > 0:
            raise ValueError(f"weights must be ({k},) non-negative with a positive sum, got {weights.tolist()}")
        self.num_classes = 0
        if classes is not None:
            classes = torch.as_tensor(classes, dtype=torch.long)
            if classes.shape != (k,) or bool((classes < 0).any()):
                raise ValueError(f"classes must be ({k},) non-negative ints, one per component, got {classes.tolist()}")
            self.num_classes = int(classes.max()) + 1
            self.register_buffer("classes", classes.clone())
        self.image_shape = shape
        self.schedule = schedule if schedule is not None else VPSchedule()
        self.register_buffer("means", means.reshape(k, -1).clone())
        self.register_buffer("variances", (stds ** 2).reshape(k, -1).clone())
        self.register_buffer("log_weights", torch.log(weights / weights.sum()))

    @classmethod
    def random(cls, num_components: int, shape, seed: int = 0, spread: float = 1.0,
               std_range=(0.2, 0.5), diagonal: bool = False, schedule=None, classes=None) -> "GaussianMixture":
        """A reproducible random mixture: means ~ N(0, spread^2), stds uniform in std_range
        (one per component, or per pixel when diagonal), weights uniform in [0.5, 1.5]."""
        g = torch.Generator().manual_seed(seed)
        k, shape = int(num_components), tuple(shape)
        means = spread * torch.randn(k, *shape, generator=g, dtype=torch.float64)
        lo, hi = std_range
        stds = lo + (hi - lo) * torch.rand(*((k, *shape) if diagonal else (k,)), generator=g, dtype=torch.float64)
        weights = 0.5 + torch.rand(k, generator=g, dtype=torch.float64)
        return cls(means, stds, weights, schedule=schedule, classes=classes)

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def _continuous_time(self, t_model):
        if isinstance(self.schedule, DiscreteVPSchedule):  # model_time(t) = t N - 1
            return (t_model + 1.0) / self.schedule.num_steps
        return t_model

    def _check(self, x, t):
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"x must have shape (B, *{self.image_shape}), got {tuple(x.shape)}")
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},) or be a scalar, got {tuple(t.shape)}")
        return t

    def _class_log_weights(self, labels, batch: int, dtype):
        """(B, K) log weights restricted to each sample's class (null class: all components)."""
        log_w = self.log_weights.to(dtype)[None].expand(batch, -1)
        if labels is None:
            return log_w
        if not self.num_classes:
            raise ValueError("labels given to a mixture without classes")
        labels = torch.as_tensor(labels, device=self.log_weights.device).expand(batch)
        keep = (self.classes[None] == labels[:, None]) | (labels[:, None] == self.num_classes)
        return torch.where(keep, log_w, torch.full_like(log_w, -math.inf))

    def forward(self, x: torch.Tensor, t, labels=None) -> torch.Tensor:
        """eps*(x, t): x (B, *image_shape), t (B,) model time; returns (B, *image_shape).

        labels (B,): exact conditional eps of each sample's class (num_classes: unconditional)."""
        t = self._continuous_time(self._check(x, t))
        gamma = self.schedule.gamma(t)[:, None, None]                        # (B, 1, 1)
        x_bar = (x / self.schedule.alpha(t).view(-1, *([1] * (x.dim() - 1)))).flatten(1)[:, None, :]
        mu, var = self.means.to(x.dtype), self.variances.to(x.dtype)
        c = var[None] + gamma * gamma                                          # (B, K, D)
        diff = x_bar - mu[None]                                                # (B, K, D)
        log_p = self._class_log_weights(labels, x.shape[0], x.dtype) - 0.5 * (diff * diff / c + torch.log(c)).sum(-1)
        p = torch.softmax(log_p, dim=1)[:, :, None]                            # (B, K, 1)
        eps = gamma[:, 0] * (p * diff / c).sum(1)
        return eps.view_as(x)

    def exact_deps(self, x: torch.Tensor, t, labels=None) -> torch.Tensor:
        """d eps*/d gamma along the probability-flow ODE (of class ``labels``) at (x, t), by forward-mode autodiff."""
        from ..solvers import exact_deps

        t = self._check(x, t)
        t_cont = self._continuous_time(t)
        return exact_deps(lambda x_, t_: self(x_, t_, labels), x, t_cont, self(x, t, labels), self.schedule)

    def eps_and_head(self, x: torch.Tensor, t, labels=None):
        """(eps*, exact deps packed as a raw head [-gamma deps | 0 | 0]) for the ``genie`` solver."""
        eps = self(x, t, labels)
        deps = self.exact_deps(x, t, labels)
        gamma = self.schedule.gamma(self._continuous_time(self._check(x, t)))
        h1 = -gamma.view(-1, *([1] * (x.dim() - 1))) * deps
        return eps, torch.cat([h1, torch.zeros_like(h1), torch.zeros_like(h1)], dim=1)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws of x0 from the mixture (float64, on the buffers' device)."""
        comp = torch.multinomial(self.log_weights.exp().cpu(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], dtype=torch.float64, generator=generator)
        comp, z = comp.to(self.means.device), z.to(self.means.device)
        x0 = self.means[comp] + self.variances[comp].sqrt() * z
        return x0.view(n, *self.image_shape)

    def ode_solution(self, x: torch.Tensor, t_from, t_to) -> torch.Tensor:
        """Closed-form probability-flow ODE solution for a single Gaussian (K = 1).

        With eps* = gamma (x_bar - mu) / (s^2 + gamma^2), d x_bar / d gamma = eps* integrates to
        x_bar(gamma) - mu = (x_bar(gamma_0) - mu) sqrt((s^2 + gamma^2) / (s^2 + gamma_0^2)).
        x: network input at continuous time t_from; returns the input at t_to (x's dtype).
        """
        if self.num_components != 1:
            raise ValueError(f"ode_solution is closed-form only for one component, this mixture has {self.num_components}")
        s = self.schedule
        g0, g1 = s.gamma(float(t_from)), s.gamma(float(t_to))
        mu, var = self.means[0].to(x.dtype), self.variances[0].to(x.dtype)
        x_bar = x.flatten(1) * math.sqrt(1.0 + g0 * g0)
        x_bar = mu + (x_bar - mu) * torch.sqrt((var + g1 * g1) / (var + g0 * g0))
        return (x_bar / math.sqrt(1.0 + g1 * g1)).view_as(x)
