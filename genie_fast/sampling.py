"""`genie_fast.sample`: noise in, samples out, for any eps model and any solver in SOLVERS."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .schedule import VPSchedule, time_grid
from .solvers import NFE_PER_STEP, SOLVERS, nfe_of, steps_for_nfe

__all__ = ["sample", "make_noise"]


def make_noise(n: int, shape, seed: int = 0, dtype=torch.float32, device=None) -> torch.Tensor:
    """(n, *shape) standard normal noise; sample i is drawn from its own generator seeded seed + i,
    on the CPU, so it does not depend on n, the batch around it, or the device."""
    rows = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed + i), dtype=torch.float32)
            for i in range(n)]
    return torch.stack(rows).to(device=device, dtype=dtype)


def _model_device(model):
    if isinstance(model, torch.nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return None


def _execute(fn, model, x, ts, schedule, *, afs, denoise, backend, **kw):
    """The one place a solver runs. A CUDA-graph engine for device="cuda" hooks in here."""
    if x.is_cuda and not kw and x.dtype != torch.float64:
        from .engine import engine_solver_name, sample_on_device  # fp16 network, one CUDA graph per key

        name = engine_solver_name(fn)
        if name is not None:
            x0, nfe = sample_on_device(model, x, ts, schedule, solver=name, afs=afs, denoise=denoise,
                                       backend=backend)
            return x0.to(x.dtype), nfe
    with torch.no_grad():
        return fn(model, x, ts, schedule, afs=afs, denoise=denoise, backend=backend, **kw)


def sample(model=None, noise=None, n=None, shape=None, solver="genie", nfe=10, grid="quadratic",
           schedule=None, seed=0, afs=False, denoise=False, backend="auto", device=None, dtype=None,
           **solver_kw):
    """Draw samples with `solver` under a budget of `nfe` network evaluations.

    model: an eps model `model(x, t)` with t of shape (B,) (None: the bundled default model).
        Its `.schedule` is used when `schedule` is None (else VPSchedule()), its `.image_shape`
        when `shape` is None.
    noise: x_T of shape (B, *shape); or n (with shape) to draw it, sample i from seed + i.
    nfe: the budget. Steps = the most that fit (`solvers.steps_for_nfe`): heun and dpm_solver_2
        spend 2 per step, genie_exact 3, the rest 1; AFS saves one evaluation (genie_exact: its
        whole first step), denoise adds one. A budget that does not divide is rounded down, and the
        returned nfe says what was spent. With an explicit grid (a sequence of times) nfe may be
        None; given, it must cover that grid.
    grid: "quadratic" (GENIE's default), "uniform", "logsnr", "edm", or the times themselves.
    afs, denoise: GENIE's analytical first step and final denoising step (see `genie_fast.solvers`).
    solver_kw: passed to the solver (e.g. head= for genie, order= for unipc / ipndm).
    Returns (samples (B, *shape), nfe spent).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")
    if model is None:
        try:
            from .models import load_default
        except (ImportError, AttributeError) as e:  # pragma: no cover - depends on the model issue
            raise RuntimeError(f"no model given and the default model is not available ({e})") from e
        model = load_default()
        if device is not None:
            model = model.to(device)
    if not callable(model):
        raise TypeError(f"model must be a callable eps(x, t), got {type(model).__name__}")
    if schedule is None:
        schedule = getattr(model, "schedule", None) or VPSchedule()
    device = torch.device(device) if device is not None else None

    image_shape = getattr(model, "image_shape", None)
    if noise is not None:
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or noise.dim() < 2:
            raise ValueError("noise must be a floating-point tensor (B, C, ...)")
        if n is not None and n != noise.shape[0]:
            raise ValueError(f"n={n} disagrees with noise's batch size {noise.shape[0]}")
        want = tuple(shape) if shape is not None else (tuple(image_shape) if image_shape is not None else None)
        if want is not None and tuple(noise.shape[1:]) != want:
            raise ValueError(f"noise must have shape (B, *{want}), got {tuple(noise.shape)}")
        x = noise.to(device=device or noise.device, dtype=dtype or noise.dtype)
    else:
        if n is None or int(n) != n or n < 1:
            raise ValueError(f"give noise=, or n= a positive number of samples (got n={n})")
        shape = shape if shape is not None else image_shape
        if shape is None:
            raise ValueError("the model has no .image_shape: pass shape=(C, H, W)")
        device = device or _model_device(model) or torch.device("cpu")
        x = make_noise(int(n), shape, seed, dtype=dtype or torch.float32, device=device)

    if isinstance(grid, str):
        if nfe is None or int(nfe) != nfe:
            raise ValueError(f"nfe must be an integer budget, got {nfe!r}")
        steps = steps_for_nfe(solver, int(nfe), afs, denoise)
        if steps < 1:
            need = nfe_of(solver, 1, afs, denoise)
            raise ValueError(f"nfe={nfe} is too small for {solver} (afs={afs}, denoise={denoise}): "
                             f"one step needs {need} (NFE per step: {NFE_PER_STEP[solver]})")
        ts = time_grid(schedule, steps, grid)
    elif isinstance(grid, (Sequence, torch.Tensor)):
        ts = time_grid(schedule, None, grid)
        need = nfe_of(solver, len(ts) - 1, afs, denoise)
        if nfe is not None and need > nfe:
            raise ValueError(f"the given grid of {len(ts) - 1} steps needs {need} NFE with {solver}, over nfe={nfe}")
    else:
        raise TypeError(f"grid must be a name or a sequence of times, got {type(grid).__name__}")

    return _execute(SOLVERS[solver], model, x, ts, schedule, afs=afs, denoise=denoise, backend=backend,
                    **solver_kw)
