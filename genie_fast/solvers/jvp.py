"""Forward-mode JVPs through a network (attention and GroupNorm included), and d eps / d gamma along
the ODE by one JVP."""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from ..schedule import ode_tangents


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
