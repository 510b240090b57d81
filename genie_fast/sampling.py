"""`genie_fast.sample`: noise in, samples out, for any eps model and any solver in SOLVERS."""
from __future__ import annotations

import torch

from .engine import engine_for, make_noise
from .solvers import DEFAULT_AFS, DEFAULT_SOLVER

__all__ = ["sample", "make_noise"]


def sample(model=None, noise=None, n=None, shape=None, solver=DEFAULT_SOLVER, nfe=None, steps=None, grid="auto",
           schedule=None, seed=0, afs=DEFAULT_AFS, denoise=False, backend="auto", device=None, dtype=None, net_dtype=None,
           **solver_kw):
    """Draw samples from `model` with `solver`; returns (samples (B, *shape) on `device`, NFE per sample).

    model: an eps model ``model(x, t)`` with t of shape (B,) (None: the bundled default model).
        Its ``.schedule`` is used when `schedule` is None (else VPSchedule()), its ``.image_shape``
        when `shape` is None. It may declare ``evals_per_call`` (network evaluations per call and
        sample, e.g. 2 for a guidance wrapper on a doubled batch): budgets and the returned NFE
        count it.
    noise: x_T of shape (B, *shape), read as `dtype`; or n (with shape) to draw it, sample i from
        its own generator seeded seed + i (a sample does not change with the batch around it).
    solver: one of `genie_fast.SOLVERS` (default "genie"); solver_kw go to it (head= for genie,
        order= for unipc / ipndm) and are part of the engine's graph key.
    steps / nfe: the number of steps, or a budget of network evaluations (default budget: 10) of
        which the most steps that fit are taken (`nfe_of` says what a run costs: heun and
        dpm_solver_2 spend 2 per step, genie_exact 1 + `JVP_NFE`, the rest 1; AFS saves one
        evaluation, denoise adds one). Giving both is an error; an explicit grid needs neither
        (given, they must agree with it). The returned NFE is what was spent.
    grid: "auto" (the grid measured best for the solver on the bundled model, `solvers.AUTO_GRID`),
        "logsnr", "quadratic" (GENIE's), "uniform", "edm", or the decreasing times themselves.
    afs: the analytical first step (eps(x_T, 1) = x_T, which holds where alpha_1 ~ 0; saves one
        evaluation), on by default (measured better at 5-10 NFE for every solver on the bundled model).
        denoise: a final denoising step (+1 evaluation).
    device: where sampling runs (default: the model's device, else the noise's, else the CPU).
        The model is copied there (an nn.Module already there in net_dtype is used as is; see
        `genie_fast.engine`); on CUDA the whole loop runs as one CUDA graph per key.
    dtype: the dtype of the ODE state and of the samples: float32 (default) or float64 (for
        accuracy work; the default network dtype follows it).
    net_dtype: the network's precision: default float16 on CUDA for a module with floating-point
        weights, else `dtype`; float16/bfloat16 on the CPU is refused.
    backend: of the fused step ops ("auto", "torch", "cpp", "triton", "cuda"; `genie_fast.ops`).

    Every entry point shares these defaults: `SamplingEngine.sample` and ``genie-fast sample``.
    """
    if model is None:
        model = _default_model()
    if not callable(model):
        raise TypeError(f"model must be a callable eps(x, t), got {type(model).__name__}")
    if device is None:
        device = _model_device(model) or (noise.device if isinstance(noise, torch.Tensor) else "cpu")
    engine = engine_for(model, device, backend)
    return engine.sample(noise, n=n, shape=shape, seed=seed, solver=solver, nfe=nfe, steps=steps, grid=grid,
                         afs=afs, denoise=denoise, dtype=dtype, net_dtype=net_dtype, schedule=schedule,
                         **solver_kw)


_DEFAULT = {}  # the loaded default model, per loader (tests replace the loader)


def _default_model():
    from . import models

    try:
        loader = models.load_default
    except AttributeError as e:  # pragma: no cover - the bundled model ships with the package
        raise RuntimeError(f"no model given and the default model is not available ({e})") from e
    if loader not in _DEFAULT:
        _DEFAULT.clear()
        _DEFAULT[loader] = loader()
    return _DEFAULT[loader]


def _model_device(model):
    if isinstance(model, torch.nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return None
