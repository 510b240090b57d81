"""Triton genie_step: combine the head's [h1|h2|h3] at gamma_n, take the GENIE Taylor step on
x_bar (float32 state) and write the next network input, in one pass. See ops.genie_step_ref."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (BLOCK, C_H, C_HALF_H2, C_INV_SCALE_NEXT, check_dtypes, check_out, head_deps, sample_block,
                      sample_grid)


@triton.jit
def _genie_step_kernel(xb_ptr, eps_ptr, head_ptr, c_ptr, c_stride, xb_out_ptr, x_out_ptr, per_sample,
                       blocks_per_sample, BLOCK: tl.constexpr):
    start, k, mask = sample_block(per_sample, blocks_per_sample, BLOCK)
    offs = start + k
    xb = tl.load(xb_ptr + offs, mask=mask)
    op_t = xb.dtype  # float32 math for a float32 state, float64 for float64
    h = tl.load(c_ptr + C_H * c_stride).to(op_t)
    half_h2 = tl.load(c_ptr + C_HALF_H2 * c_stride).to(op_t)
    inv_scale_next = tl.load(c_ptr + C_INV_SCALE_NEXT * c_stride).to(op_t)
    e = tl.load(eps_ptr + offs, mask=mask).to(op_t)
    deps = head_deps(head_ptr, c_ptr, c_stride, start, k, mask, per_sample, op_t)
    v = (xb + h * e) + half_h2 * deps
    tl.store(xb_out_ptr + offs, v, mask=mask)
    tl.store(x_out_ptr + offs, (v * inv_scale_next).to(x_out_ptr.dtype.element_ty), mask=mask)


def genie_step(x_bar: torch.Tensor, eps: torch.Tensor, head_out: torch.Tensor, coeffs: torch.Tensor,
               x_bar_next: torch.Tensor, x_next: torch.Tensor):
    """Writes (x_bar_next, x_next) into the given contiguous outputs (which may be the inputs: each
    element is read before it is written). Strided inputs are copied contiguous."""
    check_dtypes(x_bar, eps, coeffs)
    if head_out.dtype != eps.dtype:
        raise TypeError(f"head output dtype {head_out.dtype} differs from eps dtype {eps.dtype}")
    check_out(x_bar_next, x_bar, x_bar.dtype, "x_bar_next")
    check_out(x_next, x_bar, eps.dtype, "x_next")
    n = x_bar.numel()
    if n == 0:
        return
    x_bar, eps, head_out = x_bar.contiguous(), eps.contiguous(), head_out.contiguous()
    launch, blocks = sample_grid(x_bar.shape[0], n // x_bar.shape[0])
    _genie_step_kernel[launch](x_bar, eps, head_out, coeffs, coeffs.stride(0), x_bar_next, x_next,
                               n // x_bar.shape[0], blocks, BLOCK=BLOCK)
