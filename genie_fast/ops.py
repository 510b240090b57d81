"""The single place that picks an implementation for each fused op.

Every op has a plain PyTorch reference (`<op>_ref`, the readable math that the solvers'
default path runs and every kernel is tested against) and compiled versions registered
as `torch.ops.genie_fast.<op>` (C++ on the CPU; Triton and CUDA on the GPU).

Coefficients are read from a row of `schedule.coeff_table` (columns in
`schedule.COEFF_COLUMNS`), so a step never needs a host scalar or a host-device sync.
"""
from __future__ import annotations

import torch

from ._ext import has_op
from .schedule import COL

__all__ = ["head_combine_ref", "taylor_step_ref", "genie_step_ref", "genie_step", "BACKENDS"]

BACKENDS = ("auto", "torch", "cpp", "triton", "cuda")


def _opmath(x_bar: torch.Tensor) -> torch.dtype:
    return torch.float64 if x_bar.dtype == torch.float64 else torch.float32


def head_combine_ref(head_out: torch.Tensor, gamma) -> torch.Tensor:
    """d eps / d gamma from the GENIE head's raw output (B, 3C, ...) = [h1 | h2 | h3].

    -h1 / gamma + h2 gamma / (1 + gamma^2) + h3 / (gamma (1 + gamma^2)); gamma a float or a
    tensor broadcastable against h1 (e.g. shape (B, 1, 1, 1)).
    """
    if head_out.shape[1] % 3:
        raise ValueError(f"head output must have 3*C channels on dim 1, got shape {tuple(head_out.shape)}")
    h1, h2, h3 = head_out.chunk(3, dim=1)
    one_g2 = 1.0 + gamma * gamma
    return -h1 / gamma + h2 * (gamma / one_g2) + h3 / (gamma * one_g2)


def taylor_step_ref(x_bar, eps, deps, coeffs):
    """One truncated-Taylor step of the DDIM ODE d x_bar / d gamma = eps (GENIE eq. 9).

    x_bar_next = x_bar + h eps + h^2/2 deps  (deps=None: the Euler/DDIM step),
    x_next = x_bar_next / sqrt(1 + gamma_next^2), the next network input, in eps's dtype.
    coeffs: one row of `coeff_table`. Arithmetic in float32 (float64 for a float64 state).
    """
    dt = _opmath(x_bar)
    c = coeffs.to(dt)
    x_bar_next = x_bar.to(dt) + c[COL["h"]] * eps.to(dt)
    if deps is not None:
        x_bar_next = x_bar_next + c[COL["half_h2"]] * deps.to(dt)
    x_next = (x_bar_next * c[COL["inv_scale_next"]]).to(eps.dtype)
    return x_bar_next.to(x_bar.dtype), x_next


def genie_step_ref(x_bar, eps, head_out, coeffs):
    """GENIE step from the head's raw output: combine [h1|h2|h3] at gamma_n, then Taylor step."""
    dt = _opmath(x_bar)
    c = coeffs.to(dt)
    h1, h2, h3 = head_out.to(dt).chunk(3, dim=1)
    deps = c[COL["w1"]] * h1 + c[COL["w2"]] * h2 + c[COL["w3"]] * h3
    return taylor_step_ref(x_bar, eps, deps, coeffs)


def _check_step_args(x_bar, eps, head_out, coeffs):
    if x_bar.shape != eps.shape:
        raise ValueError(f"x_bar {tuple(x_bar.shape)} and eps {tuple(eps.shape)} must have the same shape")
    if x_bar.dim() < 2:
        raise ValueError(f"x_bar must be (B, C, ...), got shape {tuple(x_bar.shape)}")
    if head_out is not None:
        want = (x_bar.shape[0], 3 * x_bar.shape[1], *x_bar.shape[2:])
        if tuple(head_out.shape) != want:
            raise ValueError(f"head output must have shape {want} (3*C channels), got {tuple(head_out.shape)}")
    if coeffs.dim() != 1 or coeffs.numel() < len(COL):
        raise ValueError(f"coeffs must be one row of coeff_table ({len(COL)} values), got shape {tuple(coeffs.shape)}")


def _pick(op: str, device: torch.device, backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        if device.type == "cpu" and has_op(op):
            return "cpp"
        return "torch"
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend 'cpp' runs on the CPU, but the tensors are on {device}")
        if not has_op(op):
            raise RuntimeError(f"backend 'cpp' asked for, but genie_fast._C (op {op}) is not built")
    if backend in ("triton", "cuda"):
        raise NotImplementedError(f"backend {backend!r} for {op} is not available yet")
    return backend


def genie_step(x_bar, eps, head_out, coeffs, backend: str = "auto"):
    """Fused GENIE step; see `genie_step_ref`. Returns (x_bar_next, x_next)."""
    _check_step_args(x_bar, eps, head_out, coeffs)
    which = _pick("genie_step", x_bar.device, backend)
    if which == "cpp":
        return torch.ops.genie_fast.genie_step(x_bar, eps, head_out, coeffs)
    return genie_step_ref(x_bar, eps, head_out, coeffs)
