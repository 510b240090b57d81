"""Checks of what a network returns, and the opt-in search for where a run stopped being finite."""
from __future__ import annotations

import contextlib
import contextvars

import torch


class NonFiniteError(FloatingPointError):
    """Samples (or latents), or the ODE state on the way to them, hold NaN or inf."""


_FIND_NONFINITE = contextvars.ContextVar("genie_fast_find_nonfinite", default=False)


@contextlib.contextmanager
def find_nonfinite():
    """Inside, every network call of a solver checks its input and outputs and raises
    `NonFiniteError` naming the first step where the state or the model's output stopped being
    finite. Each check syncs host and device: for a diagnostic re-run only (`SamplingEngine` re-runs
    a call whose result is not finite this way), never in a captured graph."""
    token = _FIND_NONFINITE.set(True)
    try:
        yield
    finally:
        _FIND_NONFINITE.reset(token)


def _output(out, x, what: str, channels: int = 1) -> torch.Tensor:
    """A network output must be a tensor of the input's shape (channels x C for a raw head output):
    no None, and no shape that the step math would broadcast. Host-side shapes only: no sync."""
    want = (x.shape[0], channels * x.shape[1], *x.shape[2:])
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{what} returned {type(out).__name__}, not a tensor of shape {want}")
    if tuple(out.shape) != want:
        raise ValueError(f"{what} returned shape {tuple(out.shape)} for an input of shape {tuple(x.shape)}; "
                         f"it must be {want} (no broadcasting)")
    return out


def _pair(out, what: str):
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError(f"{what} must return a pair (eps, ...), got {type(out).__name__}")
    return out
