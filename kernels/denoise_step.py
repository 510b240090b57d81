"""Triton denoise_step: the final denoising x0 = x_bar - gamma_next eps (state dtype), one pass.
See ops.denoise_step_ref."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import BLOCK, C_GAMMA_NEXT, check_dtypes, check_out, grid


@triton.jit
def _denoise_step_kernel(xb_ptr, eps_ptr, c_ptr, c_stride, x0_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    xb = tl.load(xb_ptr + offs, mask=mask)
    gamma_next = tl.load(c_ptr + C_GAMMA_NEXT * c_stride).to(xb.dtype)
    e = tl.load(eps_ptr + offs, mask=mask).to(xb.dtype)
    tl.store(x0_ptr + offs, xb - gamma_next * e, mask=mask)


def denoise_step(x_bar: torch.Tensor, eps: torch.Tensor, coeffs: torch.Tensor, x0: torch.Tensor):
    """Writes x0 into the given contiguous output (which may be x_bar)."""
    check_dtypes(x_bar, eps, coeffs)
    check_out(x0, x_bar, x_bar.dtype, "x0")
    n = x_bar.numel()
    if n == 0:
        return
    x_bar, eps = x_bar.contiguous(), eps.contiguous()
    _denoise_step_kernel[grid(n)](x_bar, eps, coeffs, coeffs.stride(0), x0, n, BLOCK=BLOCK)
