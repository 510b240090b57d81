"""Triton genie_multistep_step: at one network evaluation, the data prediction x0 and its log-SNR
derivative d (from the head's [h1|h2|h3]), the corrector of the step that ended there and the
predictor of the next step (two weighted sums over x0, d and the history slots), and the next
network input, in one pass. See ops.genie_multistep_step_ref."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from genie_fast.layout import MULTISTEP_D_SLOTS, MULTISTEP_TERMS, MULTISTEP_WEIGHTS, MULTISTEP_X0_SLOTS

from ._common import BLOCK, C_GAMMA, check_dtypes, check_out, check_weights, head_deps, sample_block, sample_grid

# first weight of the predictor's sum, and the input scale of the next evaluation
W_PRED = tl.constexpr(MULTISTEP_TERMS)
W_INV_SCALE = tl.constexpr(2 * MULTISTEP_TERMS)


@triton.jit
def _weighted_sum(acc, w_ptr, w_stride, first: tl.constexpr, x0, d, x0_0, x0_1, x0_2, d_0, d_1):
    """acc + w[first] x0 + w[first + 1] d + ... + w[first + 6] d_1, added left to right."""
    op_t = acc.dtype
    acc = acc + tl.load(w_ptr + (first + 0) * w_stride).to(op_t) * x0
    acc = acc + tl.load(w_ptr + (first + 1) * w_stride).to(op_t) * d
    acc = acc + tl.load(w_ptr + (first + 2) * w_stride).to(op_t) * x0_0
    acc = acc + tl.load(w_ptr + (first + 3) * w_stride).to(op_t) * x0_1
    acc = acc + tl.load(w_ptr + (first + 4) * w_stride).to(op_t) * x0_2
    acc = acc + tl.load(w_ptr + (first + 5) * w_stride).to(op_t) * d_0
    acc = acc + tl.load(w_ptr + (first + 6) * w_stride).to(op_t) * d_1
    return acc


@triton.jit
def history_slot(slot: tl.constexpr, n, offs):
    """Offset of element `offs` (64-bit) in history slot `slot` of a stacked (slots, *state) history
    of n elements per slot: slot * n + offs in 64 bits. (n arrives as a 32-bit integer below 2**31,
    so slot * n in its own type would wrap from n = 2**30 on: 3 x 3 x 256 x 256 x 512 elements.)"""
    return tl.cast(n, tl.int64) * slot + offs


@triton.jit
def _genie_multistep_step_kernel(xb_ptr, xb_eval_ptr, eps_ptr, head_ptr, x0_hist_ptr, d_hist_ptr, w_ptr, w_stride,
                                 c_ptr, c_stride, xb_out_ptr, xb_pred_out_ptr, x_out_ptr, x0_out_ptr, d_out_ptr, n,
                                 per_sample, blocks_per_sample, BLOCK: tl.constexpr):
    start, k, mask = sample_block(per_sample, blocks_per_sample, BLOCK)
    offs = start + k
    xb = tl.load(xb_ptr + offs, mask=mask)
    op_t = xb.dtype  # float32 math for a float32 state, float64 for float64
    gamma = tl.load(c_ptr + C_GAMMA * c_stride).to(op_t)
    xb_eval = tl.load(xb_eval_ptr + offs, mask=mask)
    e = tl.load(eps_ptr + offs, mask=mask).to(op_t)
    deps = head_deps(head_ptr, c_ptr, c_stride, start, k, mask, per_sample, op_t)
    # history slot k of element i sits at k * n + i; every input is read before any output is written
    x0_0 = tl.load(x0_hist_ptr + offs, mask=mask)
    x0_1 = tl.load(x0_hist_ptr + history_slot(1, n, offs), mask=mask)
    x0_2 = tl.load(x0_hist_ptr + history_slot(2, n, offs), mask=mask)
    d_0 = tl.load(d_hist_ptr + offs, mask=mask)
    d_1 = tl.load(d_hist_ptr + history_slot(1, n, offs), mask=mask)
    x0 = xb_eval - gamma * e
    d = (gamma * gamma) * deps
    nxt = _weighted_sum(tl.load(w_ptr).to(op_t) * xb, w_ptr, w_stride, 1, x0, d, x0_0, x0_1, x0_2, d_0, d_1)
    pred = _weighted_sum(tl.load(w_ptr + W_PRED * w_stride).to(op_t) * nxt, w_ptr, w_stride, W_PRED + 1,
                         x0, d, x0_0, x0_1, x0_2, d_0, d_1)
    inv_scale = tl.load(w_ptr + W_INV_SCALE * w_stride).to(op_t)
    tl.store(xb_out_ptr + offs, nxt, mask=mask)
    tl.store(xb_pred_out_ptr + offs, pred, mask=mask)
    tl.store(x_out_ptr + offs, (pred * inv_scale).to(x_out_ptr.dtype.element_ty), mask=mask)
    tl.store(x0_out_ptr + offs, x0, mask=mask)
    tl.store(d_out_ptr + offs, d, mask=mask)


def genie_multistep_step(x_bar: torch.Tensor, x_bar_eval: torch.Tensor, eps: torch.Tensor, head_out: torch.Tensor,
                         x0_hist: torch.Tensor, d_hist: torch.Tensor, weights: torch.Tensor, coeffs: torch.Tensor,
                         x_bar_next: torch.Tensor, x_bar_pred: torch.Tensor, x_pred: torch.Tensor, x0: torch.Tensor,
                         d: torch.Tensor):
    """Writes (x_bar_next, x_bar_pred, x_pred, x0, d); outputs as in genie_step (they may be the
    inputs, a history slot included: each element is read before it is written)."""
    check_dtypes(x_bar, eps, coeffs)
    if head_out.dtype != eps.dtype:
        raise TypeError(f"head output dtype {head_out.dtype} differs from eps dtype {eps.dtype}")
    for name, t in (("x_bar_eval", x_bar_eval), ("x0_hist", x0_hist), ("d_hist", d_hist)):
        if t.dtype != x_bar.dtype:
            raise TypeError(f"{name} dtype {t.dtype} must be the state dtype {x_bar.dtype}")
    check_weights(weights, MULTISTEP_WEIGHTS, x_bar.device)
    if x0_hist.shape[0] != MULTISTEP_X0_SLOTS or d_hist.shape[0] != MULTISTEP_D_SLOTS:
        raise ValueError(f"x0_hist and d_hist must hold {MULTISTEP_X0_SLOTS} and {MULTISTEP_D_SLOTS} slots, "
                         f"got {x0_hist.shape[0]} and {d_hist.shape[0]}")
    devices = {t.device for t in (x_bar_eval, head_out, x0_hist, d_hist)}
    if devices != {x_bar.device}:
        raise ValueError(f"every input must be on x_bar's device {x_bar.device}, got {sorted(map(str, devices))}")
    check_out(x_bar_next, x_bar, x_bar.dtype, "x_bar_next")
    check_out(x_bar_pred, x_bar, x_bar.dtype, "x_bar_pred")
    check_out(x_pred, x_bar, eps.dtype, "x_pred")
    check_out(x0, x_bar, x_bar.dtype, "x0")
    check_out(d, x_bar, x_bar.dtype, "d")
    n = x_bar.numel()
    if n == 0:
        return
    x_bar, x_bar_eval, eps = x_bar.contiguous(), x_bar_eval.contiguous(), eps.contiguous()
    head_out, x0_hist, d_hist = head_out.contiguous(), x0_hist.contiguous(), d_hist.contiguous()
    launch, blocks = sample_grid(x_bar.shape[0], n // x_bar.shape[0])
    _genie_multistep_step_kernel[launch](x_bar, x_bar_eval, eps, head_out, x0_hist, d_hist, weights,
                                         weights.stride(0), coeffs, coeffs.stride(0), x_bar_next, x_bar_pred,
                                         x_pred, x0, d, n, n // x_bar.shape[0], blocks, BLOCK=BLOCK)
