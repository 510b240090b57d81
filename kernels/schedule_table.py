"""Triton schedule_table: schedule.coeff_table of a VPSchedule computed on the device for a grid
of times (one program per BLOCK steps, float64), so no host table has to be copied in."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from genie_fast.schedule import COEFF_COLUMNS, COL

_NCOLS = tl.constexpr(len(COEFF_COLUMNS))
_BLOCK = 128
# column indices as compile-time constants
_T, _T_NEXT, _GAMMA, _GAMMA_NEXT = (tl.constexpr(COL[c]) for c in ("t", "t_next", "gamma", "gamma_next"))
_H, _HALF_H2, _W1, _W2, _W3 = (tl.constexpr(COL[c]) for c in ("h", "half_h2", "w1", "w2", "w3"))
_SCALE, _INV_SCALE_NEXT = tl.constexpr(COL["scale"]), tl.constexpr(COL["inv_scale_next"])
_DPM_R = tl.constexpr(COL["dpm_r"])


@triton.jit
def _expm1(x):
    # Kahan's expm1 from exp and log: accurate to a few ulp also for tiny x (t near t_end)
    u = tl.exp(x)
    um1 = u - 1.0
    log_u = tl.log(tl.where(u == 1.0, 2.0, u))
    return tl.where(u == 1.0, x, tl.where(um1 == -1.0, -1.0, um1 * x / log_u))


@triton.jit
def _vp_gamma(t, beta_min, beta_d):
    log_alpha = -0.5 * (beta_min * t + (0.5 * beta_d) * t * t)
    return tl.sqrt(_expm1(-2.0 * log_alpha))  # gamma^2 = 1/alpha^2 - 1


@triton.jit
def _schedule_table_kernel(ts_ptr, table_ptr, n_steps, beta_min: tl.float64, beta_d: tl.float64,
                           BLOCK: tl.constexpr):
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = n < n_steps
    t = tl.load(ts_ptr + n, mask=mask, other=0.5).to(tl.float64)
    t_next = tl.load(ts_ptr + n + 1, mask=mask, other=0.25).to(tl.float64)
    g = _vp_gamma(t, beta_min, beta_d)
    gn = _vp_gamma(t_next, beta_min, beta_d)
    h = gn - g
    one_g2 = 1.0 + g * g
    row = table_ptr + n.to(tl.int64) * _NCOLS
    tl.store(row + _T, t, mask=mask)
    tl.store(row + _T_NEXT, t_next, mask=mask)
    tl.store(row + _GAMMA, g, mask=mask)
    tl.store(row + _GAMMA_NEXT, gn, mask=mask)
    tl.store(row + _H, h, mask=mask)
    tl.store(row + _HALF_H2, 0.5 * h * h, mask=mask)
    tl.store(row + _W1, -1.0 / g, mask=mask)
    tl.store(row + _W2, g / one_g2, mask=mask)
    tl.store(row + _W3, 1.0 / (g * one_g2), mask=mask)
    tl.store(row + _SCALE, tl.sqrt(one_g2), mask=mask)
    tl.store(row + _INV_SCALE_NEXT, 1.0 / tl.sqrt(1.0 + gn * gn), mask=mask)
    tl.store(row + _DPM_R, gn / g, mask=mask)


def schedule_table(ts: torch.Tensor, beta_min: float, beta_d: float) -> torch.Tensor:
    """(N, len(COEFF_COLUMNS)) float64 table on ts's device for the grid ts (N + 1 times)."""
    if ts.dim() != 1 or ts.numel() < 2:
        raise ValueError(f"ts must be a 1-D grid of at least two times, got shape {tuple(ts.shape)}")
    if ts.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"ts must be float32 or float64, got {ts.dtype}")
    if not (beta_min >= 0 and beta_d > 0):
        raise ValueError(f"VP schedule needs beta_min >= 0 and beta_d > 0, got {beta_min}, {beta_d}")
    ts = ts.contiguous()
    n_steps = ts.numel() - 1
    table = torch.empty((n_steps, len(COEFF_COLUMNS)), dtype=torch.float64, device=ts.device)
    _schedule_table_kernel[(triton.cdiv(n_steps, _BLOCK),)](ts, table, n_steps, float(beta_min), float(beta_d),
                                                             BLOCK=_BLOCK)
    return table
