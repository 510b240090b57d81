"""The single place that picks an implementation for each fused op.

Every op has a plain PyTorch reference (`<op>_ref`, the readable math, against which every
kernel is tested) and compiled versions registered as `torch.ops.genie_fast.<op>`
(C++ on the CPU; Triton and CUDA on the GPU). Solvers call the un-suffixed function with a
`backend` ("auto" | "torch" | "cpp" | "triton" | "cuda").

Coefficients are read from a row of `schedule.coeff_table` (columns in
`schedule.COEFF_COLUMNS`), so a step never needs a host scalar or a host-device sync.
States (x_bar, x0) are float32 (float64 for float64 runs); eps, the head output and the next
network input x are in the network's dtype.
"""
from __future__ import annotations

import torch

from ._ext import has_op
from .schedule import COL

__all__ = [
    "BACKENDS", "head_combine_ref",
    "taylor_step_ref", "genie_step_ref", "ddim_step_ref", "denoise_step_ref", "dpmpp_2m_step_ref",
    "taylor_step", "genie_step", "ddim_step", "denoise_step", "dpmpp_2m_step",
]

BACKENDS = ("auto", "torch", "cpp", "triton", "cuda")


def _opmath(x_bar: torch.Tensor) -> torch.dtype:
    return torch.float64 if x_bar.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- references

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


def ddim_step_ref(x_bar, eps, coeffs):
    """Euler step in gamma (= DDIM). With eps = x_T at t = 1 it is the analytical first step."""
    return taylor_step_ref(x_bar, eps, None, coeffs)


def denoise_step_ref(x_bar, eps, coeffs):
    """Final denoising at the END of step `coeffs`: x0 = x_bar - gamma_next * eps (state dtype)."""
    dt = _opmath(x_bar)
    return (x_bar.to(dt) - coeffs.to(dt)[COL["gamma_next"]] * eps.to(dt)).to(x_bar.dtype)


def dpmpp_2m_step_ref(x_bar, eps, x0_prev, coeffs):
    """DPM-Solver++(2M) step (Lu et al. 2022, eq. for the multistep data-prediction solver).

    In x_bar = x / alpha it reads x_bar_next = r x_bar + (1 - r) (a x0 + b x0_prev) with
    x0 = x_bar - gamma eps, r = gamma_next / gamma and a, b from the logSNR step ratio.
    Returns (x_bar_next, x_next, x0); x0 is the next step's x0_prev (state dtype).
    """
    dt = _opmath(x_bar)
    c = coeffs.to(dt)
    x0 = x_bar.to(dt) - c[COL["gamma"]] * eps.to(dt)
    d = c[COL["dpm_a"]] * x0 + c[COL["dpm_b"]] * x0_prev.to(dt)
    x_bar_next = c[COL["dpm_r"]] * x_bar.to(dt) + (1.0 - c[COL["dpm_r"]]) * d
    x_next = (x_bar_next * c[COL["inv_scale_next"]]).to(eps.dtype)
    return x_bar_next.to(x_bar.dtype), x_next, x0.to(x_bar.dtype)


# --------------------------------------------------------------------------- dispatch

def _check_step_args(x_bar, eps, coeffs, head_out=None):
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


def taylor_step(x_bar, eps, deps, coeffs, backend: str = "auto"):
    """Taylor step with an explicit d eps/d gamma (exact JVP or a deps callable)."""
    _check_step_args(x_bar, eps, coeffs)
    if deps is not None and deps.shape != x_bar.shape:
        raise ValueError(f"deps {tuple(deps.shape)} must have the shape of x_bar {tuple(x_bar.shape)}")
    _pick("taylor_step", x_bar.device, backend)
    return taylor_step_ref(x_bar, eps, deps, coeffs)


def genie_step(x_bar, eps, head_out, coeffs, backend: str = "auto"):
    """Fused GENIE step; see `genie_step_ref`. Returns (x_bar_next, x_next)."""
    _check_step_args(x_bar, eps, coeffs, head_out)
    if _pick("genie_step", x_bar.device, backend) == "cpp":
        return torch.ops.genie_fast.genie_step(x_bar, eps, head_out, coeffs)
    return genie_step_ref(x_bar, eps, head_out, coeffs)


def ddim_step(x_bar, eps, coeffs, backend: str = "auto"):
    """DDIM / AFS step; see `ddim_step_ref`. Returns (x_bar_next, x_next)."""
    _check_step_args(x_bar, eps, coeffs)
    _pick("ddim_step", x_bar.device, backend)
    return ddim_step_ref(x_bar, eps, coeffs)


def denoise_step(x_bar, eps, coeffs, backend: str = "auto"):
    """Final denoising step; see `denoise_step_ref`. Returns x0."""
    _check_step_args(x_bar, eps, coeffs)
    _pick("denoise_step", x_bar.device, backend)
    return denoise_step_ref(x_bar, eps, coeffs)


def dpmpp_2m_step(x_bar, eps, x0_prev, coeffs, backend: str = "auto"):
    """DPM-Solver++(2M) step; see `dpmpp_2m_step_ref`. Returns (x_bar_next, x_next, x0)."""
    _check_step_args(x_bar, eps, coeffs)
    if x0_prev.shape != x_bar.shape:
        raise ValueError(f"x0_prev {tuple(x0_prev.shape)} must have the shape of x_bar {tuple(x_bar.shape)}")
    _pick("dpmpp_2m_step", x_bar.device, backend)
    return dpmpp_2m_step_ref(x_bar, eps, x0_prev, coeffs)
