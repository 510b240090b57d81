"""Triton dpmpp_2m_step: DPM-Solver++(2M) in x_bar, one pass writing x_bar_next, the next network
input and this step's x0 (the next x0_prev). See ops.dpmpp_2m_step_ref."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from genie_fast.layout import DPMPP_2M_A, DPMPP_2M_B, DPMPP_2M_WEIGHTS

from ._common import BLOCK, C_DPM_R, C_GAMMA, C_INV_SCALE_NEXT, check_dtypes, check_out, check_weights, grid

W_A, W_B = tl.constexpr(DPMPP_2M_A), tl.constexpr(DPMPP_2M_B)


@triton.jit
def _dpmpp_2m_step_kernel(xb_ptr, eps_ptr, x0_prev_ptr, w_ptr, w_stride, c_ptr, c_stride, xb_out_ptr, x_out_ptr,
                          x0_out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    xb = tl.load(xb_ptr + offs, mask=mask)
    op_t = xb.dtype
    gamma = tl.load(c_ptr + C_GAMMA * c_stride).to(op_t)
    r = tl.load(c_ptr + C_DPM_R * c_stride).to(op_t)
    a = tl.load(w_ptr + W_A * w_stride).to(op_t)
    b = tl.load(w_ptr + W_B * w_stride).to(op_t)
    inv_scale_next = tl.load(c_ptr + C_INV_SCALE_NEXT * c_stride).to(op_t)
    e = tl.load(eps_ptr + offs, mask=mask).to(op_t)
    x0_prev = tl.load(x0_prev_ptr + offs, mask=mask)
    x0 = xb - gamma * e
    d = a * x0 + b * x0_prev
    v = r * xb + (1.0 - r) * d
    tl.store(x0_out_ptr + offs, x0, mask=mask)
    tl.store(xb_out_ptr + offs, v, mask=mask)
    tl.store(x_out_ptr + offs, (v * inv_scale_next).to(x_out_ptr.dtype.element_ty), mask=mask)


def dpmpp_2m_step(x_bar: torch.Tensor, eps: torch.Tensor, x0_prev: torch.Tensor, weights: torch.Tensor,
                  coeffs: torch.Tensor, x_bar_next: torch.Tensor, x_next: torch.Tensor, x0: torch.Tensor):
    """Writes (x_bar_next, x_next, x0) from the step's weights [a, b]; outputs as in genie_step."""
    check_dtypes(x_bar, eps, coeffs)
    if x0_prev.dtype != x_bar.dtype:
        raise TypeError(f"x0_prev dtype {x0_prev.dtype} must be the state dtype {x_bar.dtype}")
    check_weights(weights, DPMPP_2M_WEIGHTS, x_bar.device)
    check_out(x_bar_next, x_bar, x_bar.dtype, "x_bar_next")
    check_out(x_next, x_bar, eps.dtype, "x_next")
    check_out(x0, x_bar, x_bar.dtype, "x0")
    n = x_bar.numel()
    if n == 0:
        return
    x_bar, eps, x0_prev = x_bar.contiguous(), eps.contiguous(), x0_prev.contiguous()
    _dpmpp_2m_step_kernel[grid(n)](x_bar, eps, x0_prev, weights, weights.stride(0), coeffs, coeffs.stride(0),
                                   x_bar_next, x_next, x0, n, BLOCK=BLOCK)
