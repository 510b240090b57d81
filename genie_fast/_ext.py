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


def has_op(name: str) -> bool:
    """True when torch.ops.genie_fast.<name> is registered (by the C++ extension)."""
    return _C is not None and hasattr(torch.ops.genie_fast, name)


def _register_fakes():
    if _C is None:
        return

    @torch.library.register_fake("genie_fast::genie_step")
    def _genie_step_fake(x_bar, eps, head_out, coeffs):
        return torch.empty_like(x_bar, memory_format=torch.contiguous_format), torch.empty_like(
            eps, memory_format=torch.contiguous_format)


_register_fakes()
