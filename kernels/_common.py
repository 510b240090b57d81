"""Shared pieces of the Triton step launchers: coefficient columns, input and output checks, grid."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from genie_fast.schedule import COL

BLOCK = 1024

# Column indices of schedule.coeff_table, as compile-time constants for the kernels.
C_GAMMA = tl.constexpr(COL["gamma"])
C_GAMMA_NEXT = tl.constexpr(COL["gamma_next"])
C_H = tl.constexpr(COL["h"])
C_HALF_H2 = tl.constexpr(COL["half_h2"])
C_W1 = tl.constexpr(COL["w1"])
C_W2 = tl.constexpr(COL["w2"])
C_W3 = tl.constexpr(COL["w3"])
C_INV_SCALE_NEXT = tl.constexpr(COL["inv_scale_next"])
C_DPM_R = tl.constexpr(COL["dpm_r"])
# dtypes of a solver's per-step weight vector (genie_fast.layout), read in the state's math type
WEIGHT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def sample_block(per_sample, blocks_per_sample, BLOCK: tl.constexpr):
    """This program's part of a launch over (sample, block within the sample), flattened into
    axis 0 (`sample_grid`): (start, k, mask) with start = b * per_sample the sample's first
    element and k its BLOCK in-sample indices, both 64-bit; element start + k of the state is
    k of sample b. The sample index costs one scalar division per program, not one 64-bit
    division per element; a block never spans two samples (the last block of each is masked)."""
    pid = tl.program_id(0)
    b = pid // blocks_per_sample
    j = pid - b * blocks_per_sample
    k = j.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return b.to(tl.int64) * per_sample, k, k < per_sample


@triton.jit
def head_deps(head_ptr, c_ptr, c_stride, start, k, mask, per_sample, op_t: tl.constexpr):
    """d eps / d gamma at the row's gamma from the raw head [h1|h2|h3] (B, 3C, ...), in op_t:
    w1 h1 + w2 h2 + w3 h3. Element start + k (k of the sample whose first element is start, see
    `sample_block`) reads h1 at 3 start + k."""
    w1 = tl.load(c_ptr + C_W1 * c_stride).to(op_t)
    w2 = tl.load(c_ptr + C_W2 * c_stride).to(op_t)
    w3 = tl.load(c_ptr + C_W3 * c_stride).to(op_t)
    h1_offs = 3 * start + k
    h1 = tl.load(head_ptr + h1_offs, mask=mask).to(op_t)
    h2 = tl.load(head_ptr + h1_offs + per_sample, mask=mask).to(op_t)
    h3 = tl.load(head_ptr + h1_offs + 2 * per_sample, mask=mask).to(op_t)
    return w1 * h1 + w2 * h2 + w3 * h3


def grid(n: int):
    return (triton.cdiv(n, BLOCK),)


def sample_grid(batch: int, per_sample: int) -> tuple[tuple[int], int]:
    """(launch grid, blocks per sample) of a kernel that reads per-sample data (`sample_block`):
    one program per BLOCK of each sample, flattened into axis 0 (2**31 - 1 programs at most, no
    limit on the batch as CUDA's 65535 of axes 1 and 2 would set)."""
    blocks = triton.cdiv(per_sample, BLOCK)
    return (batch * blocks,), blocks


def check_out(out: torch.Tensor, like: torch.Tensor, dtype: torch.dtype, name: str):
    """A preallocated output (the launchers write into given outputs only; genie_fast.ops allocates
    them for its functional API): like's shape, `dtype`, like's device, contiguous."""
    if out.shape != like.shape or out.dtype != dtype or out.device != like.device:
        raise ValueError(f"output {name} must be {tuple(like.shape)} {dtype} on {like.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"output {name} must be contiguous (row-major); channels_last or strided outputs "
                         "are not supported")


def check_weights(weights: torch.Tensor, n: int, device: torch.device):
    """A solver's per-step weight vector: n values in a float dtype on the tensors' device."""
    if weights.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"weights must be float64, float32, float16 or bfloat16, got {weights.dtype}")
    if weights.dim() != 1 or weights.numel() != n:
        raise ValueError(f"weights must be {n} values, got shape {tuple(weights.shape)}")
    if weights.device != device:
        raise ValueError(f"weights are on {weights.device}, x_bar on {device}")


def check_dtypes(x_bar: torch.Tensor, eps: torch.Tensor, coeffs: torch.Tensor):
    if x_bar.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"the ODE state x_bar must be float32 or float64, got {x_bar.dtype}")
    if eps.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"network outputs must be float32, float16, bfloat16 or float64, got {eps.dtype}")
    if x_bar.dtype == torch.float64 and eps.dtype != torch.float64:
        raise TypeError(f"a float64 state needs float64 network outputs, got eps {eps.dtype}")
    if coeffs.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"coeffs must be float32 or float64, got {coeffs.dtype}")
    if coeffs.device != x_bar.device or eps.device != x_bar.device:
        raise ValueError(f"x_bar ({x_bar.device}), eps ({eps.device}) and coeffs ({coeffs.device}) must be on "
                         "one device (move the coefficient table to the sampling device)")
