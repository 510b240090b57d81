"""Loads the compiled extension `genie_fast._C` and registers the ops' fake kernels.

The package works without it: a clear warning, once, and the PyTorch references run instead.
"""
from __future__ import annotations

import warnings

import torch

_C = None
_load_error: Exception | None = None

try:  # torch must be imported first: the module's RPATH does not find libtorch by itself
    from . import _C  # noqa: F811
except ImportError as e:  # pragma: no cover - depends on the build
    _load_error = e
    warnings.warn(
        f"genie_fast._C could not be loaded ({e}); falling back to the PyTorch reference ops. "
        "Rebuild with `pip install --no-build-isolation -e .` to get the fused kernels.",
        RuntimeWarning,
        stacklevel=2,
    )


def _registered(name: str) -> str | None:
    """The op of genie_fast._C that runs `name`: the op itself (schedule_table, or a name given
    with its suffix), else its `<name>_out` form (a step op has only that form); None: neither."""
    for op in (name, name + "_out"):
        if hasattr(torch.ops.genie_fast, op):
            return op
    return None


def has_op(name: str, device_type: str | None = None) -> bool:
    """True when genie_fast._C registers op `name` (a step op by its public name, e.g. "genie_step",
    whose kernel is torch.ops.genie_fast.genie_step_out), and, when device_type ("cpu", "cuda") is
    given, has a kernel for that device."""
    op = None if _C is None else _registered(name)
    if op is None:
        return False
    if device_type is None:
        return True
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"genie_fast::{op}", key)


def _register_fakes():
    if _C is None:
        return
    fake = torch.library.register_fake

    @fake("genie_fast::schedule_table")
    def _schedule_table_fake(ts, beta_min, beta_d):
        from .schedule import COEFF_COLUMNS

        return ts.new_empty((ts.shape[0] - 1, len(COEFF_COLUMNS)), dtype=torch.float64)

    # The step ops (`_out` only) write into their arguments and return nothing.
    @fake("genie_fast::genie_step_out")
    def _genie_step_out_fake(x_bar, eps, head_out, coeffs, x_bar_next, x_next):
        return None

    @fake("genie_fast::ddim_step_out")
    def _ddim_step_out_fake(x_bar, eps, coeffs, x_bar_next, x_next):
        return None

    @fake("genie_fast::denoise_step_out")
    def _denoise_step_out_fake(x_bar, eps, coeffs, x0):
        return None

    @fake("genie_fast::dpmpp_2m_step_out")
    def _dpmpp_2m_step_out_fake(x_bar, eps, x0_prev, weights, coeffs, x_bar_next, x_next, x0):
        return None

    @fake("genie_fast::genie_multistep_step_out")
    def _genie_multistep_step_out_fake(x_bar, x_bar_eval, eps, head_out, x0_hist, d_hist, weights, coeffs,
                                       x_bar_next, x_bar_pred, x_pred, x0, d):
        return None


_register_fakes()
