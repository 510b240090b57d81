"""Triton ddim_step: Euler in gamma (DDIM; the AFS first step with eps = x_T), one pass.
See ops.ddim_step_ref."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import BLOCK, C_H, C_INV_SCALE_NEXT, check_dtypes, check_out, grid


@triton.jit
def _ddim_step_kernel(xb_ptr, eps_ptr, c_ptr, c_stride, xb_out_ptr, x_out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    xb = tl.load(xb_ptr + offs, mask=mask)
    op_t = xb.dtype
    h = tl.load(c_ptr + C_H * c_stride).to(op_t)
    inv_scale_next = tl.load(c_ptr + C_INV_SCALE_NEXT * c_stride).to(op_t)
    e = tl.load(eps_ptr + offs, mask=mask).to(op_t)
    v = xb + h * e
    tl.store(xb_out_ptr + offs, v, mask=mask)
    tl.store(x_out_ptr + offs, (v * inv_scale_next).to(x_out_ptr.dtype.element_ty), mask=mask)


def ddim_step(x_bar: torch.Tensor, eps: torch.Tensor, coeffs: torch.Tensor, x_bar_next: torch.Tensor,
              x_next: torch.Tensor):
    """Writes (x_bar_next, x_next); outputs as in genie_step."""
    check_dtypes(x_bar, eps, coeffs)
    check_out(x_bar_next, x_bar, x_bar.dtype, "x_bar_next")
    check_out(x_next, x_bar, eps.dtype, "x_next")
    n = x_bar.numel()
    if n == 0:
        return
    x_bar, eps = x_bar.contiguous(), eps.contiguous()
    _ddim_step_kernel[grid(n)](x_bar, eps, coeffs, coeffs.stride(0), x_bar_next, x_next, n, BLOCK=BLOCK)
