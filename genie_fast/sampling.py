"""`genie_fast.sample`: noise in, samples out, for any eps model and any solver in SOLVERS."""
from __future__ import annotations

import threading

import torch

from . import ops
from .checks import check_device, check_flag
from .devices import default_device
from .engine import NonFiniteError, engine_for
from .conditioning import check_cond, check_decode
from .guidance import check_scale, wrapper_for
from .noise import make_noise, seed_noise
from .schedule import check_schedule
from .solvers import DEFAULT_SOLVER
from .solvers.accounting import _check_solver
from .solvers.options import check_grid_arg, check_solver_kw

__all__ = ["sample", "encode", "make_noise", "seed_noise", "NonFiniteError"]


def sample(model=None, noise=None, n=None, shape=None, solver=DEFAULT_SOLVER, nfe=None, steps=None, grid="auto",
           schedule=None, seed=0, afs=None, denoise=False, backend="auto", device=None, dtype=None, net_dtype=None,
           labels=None, guidance_scale=None, seeds=None, check_finite=True, cond=None, negative_cond=None,
           decode=None, **solver_kw):
    """Draw samples from `model` with `solver`; returns (samples (B, *shape) on `device`, NFE per sample).

    model: an eps model ``model(x, t)`` with t of shape (B,) (None: the bundled default model).
        Its ``.schedule`` is used when `schedule` is None (else VPSchedule()), its ``.image_shape``
        when `shape` is None. It may declare ``evals_per_call`` (network evaluations per call and
        sample, e.g. 2 for a guidance wrapper on a doubled batch): budgets and the returned NFE
        count it.
    noise: x_T of shape (B, *shape), read as `dtype`; or n (with shape) to draw it from batch seed
        `seed` (an int in [0, 2**32)): one generator seeded `seed` draws sample after sample, so the
        batches of two seeds share no sample and sample i does not depend on n (`make_noise`); or
        seeds: one per-image seed per sample, each drawn from its own generator (EDM's
        ``--seeds 0-49999``; ``genie-fast generate`` draws a seed's noise the same way, `seed_noise`).
        A sample's noise never depends on the batch around it; the sample itself changes with the
        batch only by batched float round-off (docs/guide.md, section 1, "Seeds").
    solver: one of `genie_fast.SOLVERS` (default "genie"); solver_kw go to it (head= for genie,
        order= for unipc / ipndm) and are part of the engine's graph key.
    steps / nfe: the number of steps, or a budget of network evaluations (default budget: 10) of
        which the most steps that fit are taken (`nfe_of` says what a run costs: heun and
        dpm_solver_2 spend 2 per step, genie_exact 1 + `JVP_NFE`, the rest 1; AFS saves one
        evaluation, denoise adds one). Giving both is an error; an explicit grid needs neither
        (given, they must agree with it). The returned NFE is what was spent.
    grid: "auto" (the grid measured best for the solver on the bundled model, `solvers.AUTO_GRID`),
        "logsnr", "quadratic" (GENIE's), "uniform", "edm", or the decreasing times themselves (a 1-D
        sequence, tensor or array: the network is called at these times, so AFS is off unless
        afs=True; a diffusers scheduler's loop: `models.diffusers.scheduler_grid(scheduler)`).
    afs: the analytical first step (eps(x_T, 1) = x_T, which holds where alpha_1 ~ 0; saves one
        evaluation). None (default): on with a named grid (measured better at 5-10 NFE for every
        solver on the bundled model, `solvers.AUTO_AFS`), off with an explicit grid of times.
        denoise: a final denoising step (+1 evaluation).
    device: where sampling runs (default `devices.default_device`: the model's device, else the
        noise's, else CUDA when available, else the CPU).
        The model is copied there (an nn.Module already there in net_dtype is used as is; see
        `genie_fast.engine`); on CUDA the whole loop runs as one CUDA graph per key.
    dtype: the dtype of the ODE state and of the samples: float32 (default) or float64 (for
        accuracy work; the default network dtype follows it).
    net_dtype: the network's precision: default float16 on CUDA for a module with floating-point
        weights, else `dtype`. On the CPU float16 is refused and bfloat16 ("bf16") runs where the CPU
        has native bf16 (`devices.cpu_bf16_native`), else float32 with a one-line notice.
    backend: of the fused step ops ("auto", "torch", "cpp", "triton", "cuda"; `genie_fast.ops`).
    labels: for a class-conditional model (``model.num_classes`` > 0): an int (every sample) or
        integers of shape (B,) in 0..num_classes-1 (num_classes itself is the null class). None:
        unconditional (the null class).
    guidance_scale: classifier-free guidance, eps = eps_u + s (eps_c - eps_u) (diffusers' convention;
        GENIE's paper writes w = s - 1). Default with labels: `guidance.DEFAULT_GUIDANCE_SCALE` (2.0);
        1 is the conditional model alone (one evaluation per step). A guided step evaluates both
        branches in ONE batched network call on 2B inputs: it counts 2 network evaluations per
        sample in `nfe` budgets and in the returned NFE (batched calls = NFE / 2). Labels and scale
        are device inputs of the captured graph: changing them does not capture again.
    cond: conditioning inputs, a mapping name -> batch-first tensor (B, ...) or (1, ...) (one for
        every sample) that the model receives as keyword arguments, ``model(x, t, **cond)`` (e.g.
        ``{"encoder_hidden_states": emb}`` for a diffusers UNet2DConditionModel; labels are the
        input ``labels``). negative_cond: the inputs of guidance's negative branch, by name (default:
        the model's null input where it has one, `conditioning.null_cond`; names it leaves out are
        shared with the conditional branch). With cond, guidance_scale None means the default scale
        where a negative branch exists, else 1. Like labels, they are device inputs of the
        captured graph: new values of the same shapes replay it; both branches run as one batched
        call (2 NFE per guided evaluation). docs/guide.md, "Conditioning".
    decode: None (the samples as the model samples them), a callable applied to them (e.g. a VAE's
        decoder for a latent model: the output is then its images), or True: the model's own
        ``decode`` (`models.diffusers.from_diffusers(..., vae=)`).

    check_finite: check once, after the loop, that every returned value is finite, and raise
        `NonFiniteError` naming the first step where the state or the model's output stopped being
        finite (found by an eager re-run with checks) if not; False returns results unchecked (saves
        one host-device sync per call).

    Every entry point shares these defaults: `SamplingEngine.sample` and ``genie-fast sample``.
    Every argument is checked before any work (the default model is loaded after the checks that
    need no model), with a message naming it.
    """
    _check_options(solver, grid, schedule, backend, device, check_finite, guidance_scale, solver_kw)
    if cond is not None or negative_cond is not None or decode is not None:  # (their model-free checks)
        _check_cond_args(cond, negative_cond, labels, _batch(noise, seeds, n), decode)
    if model is None:
        model = _default_model()
    if not callable(model):
        raise TypeError(f"model must be a callable eps(x, t), got {type(model).__name__}")
    if device is None:
        device = default_device(model, noise)
    batch = noise.shape[0] if isinstance(noise, torch.Tensor) else len(seeds) if _sized(seeds) else n
    decode = check_decode(decode, model) if decode is not None else None  # (the model's own decode: before wrapping)
    model = _with_labels(model, labels, guidance_scale, batch, cond, negative_cond)
    engine = engine_for(model, device, backend)
    x0, spent = engine.sample(noise, n=n, shape=shape, seed=seed, seeds=seeds, solver=solver, nfe=nfe, steps=steps,
                              grid=grid, afs=afs, denoise=denoise, dtype=dtype, net_dtype=net_dtype,
                              schedule=schedule, check_finite=check_finite, **solver_kw)
    if decode is not None:
        with torch.no_grad():
            x0 = decode(x0)
    return x0, spent


def _check_options(solver, grid, schedule, backend, device, check_finite, guidance_scale, solver_kw):
    """The arguments of sample / encode that need no model, checked first (the engine checks the
    rest, and these again, before any work)."""
    _check_solver(solver)
    check_grid_arg(grid)
    if schedule is not None:
        check_schedule(schedule)
    device = None if device is None else check_device(device)
    if device is not None or not isinstance(backend, str) or backend not in ops.BACKENDS:
        ops.check_backend(backend, "cpu" if device is None else device)
    check_flag("check_finite", check_finite)
    if guidance_scale is not None:
        check_scale(guidance_scale)
    check_solver_kw(solver, solver_kw)


def _check_cond_args(cond, negative_cond, labels, batch, decode=None):
    """What of cond / negative_cond / decode needs no model, checked before the model is loaded (the
    rest, names and null inputs, by `guidance.wrapper_for`)."""
    if negative_cond is not None and cond is None and labels is None:
        raise ValueError("negative_cond= needs cond= (or labels=): it is the other branch of guidance")
    if isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1:
        check_cond(cond, batch, "cond")
        check_cond(negative_cond, batch, "negative_cond")
    if decode is not None and decode is not True and decode is not False and not callable(decode):
        check_decode(decode, None)  # raises, naming decode


def _batch(noise, seeds, n):
    return noise.shape[0] if isinstance(noise, torch.Tensor) else len(seeds) if _sized(seeds) else n


def _sized(seeds) -> bool:
    return seeds is not None and hasattr(seeds, "__len__") and not isinstance(seeds, (str, bytes))


def encode(model=None, x0=None, solver=DEFAULT_SOLVER, nfe=None, steps=None, grid="auto", schedule=None,
           backend="auto", device=None, dtype=None, net_dtype=None, labels=None, guidance_scale=None,
           check_finite=True, cond=None, negative_cond=None, **solver_kw):
    """Encode data into latents: the probability-flow ODE solved from t_end up to t = 1 with `solver`.

    x0: data of shape (B, *image_shape), taken as the network input at t_end (the data point itself:
        alpha(t_end) ~ 1, sigma(t_end) ~ 0.003 on the default schedule).
    The grid is the reverse of the one ``sample`` builds from the same solver, nfe / steps and grid
    (an explicit grid may be given decreasing or increasing), with AFS and the denoising step off:
    neither applies to encoding. GENIE's Taylor step runs forward in gamma with the head at each
    point; multistep solvers use their history the same way. labels / guidance_scale / cond /
    negative_cond / check_finite: as in ``sample`` (encoding along the (guided) conditional ODE).
    Returns (x_T, NFE per sample).

    Decoding: ``sample(model, noise=x_T, solver=..., nfe=... or steps=..., grid=..., afs=False)``
    with the same arguments runs the same grid back (AFS would replace the first evaluation by an
    approximation and change the grid's step count).
    """
    if solver_kw.get("afs") or solver_kw.get("denoise"):
        raise ValueError("encoding runs from data to noise: AFS and the denoising step do not apply "
                         "(decode with sample(..., afs=False))")
    solver_kw.pop("afs", None)
    solver_kw.pop("denoise", None)
    _check_options(solver, grid, schedule, backend, device, check_finite, guidance_scale, solver_kw)
    if cond is not None or negative_cond is not None:
        _check_cond_args(cond, negative_cond, labels,
                         x0.shape[0] if isinstance(x0, torch.Tensor) and x0.dim() else None)
    if model is None:
        model = _default_model()
    if not callable(model):
        raise TypeError(f"model must be a callable eps(x, t), got {type(model).__name__}")
    if not isinstance(x0, torch.Tensor):
        raise TypeError(f"x0 must be a tensor of data (B, *image_shape), got {type(x0).__name__}")
    if device is None:
        device = default_device(model, x0)
    model = _with_labels(model, labels, guidance_scale, x0.shape[0] if x0.dim() else None, cond, negative_cond)
    engine = engine_for(model, device, backend)
    return engine.encode(x0, solver=solver, nfe=nfe, steps=steps, grid=grid, dtype=dtype, net_dtype=net_dtype,
                         schedule=schedule, check_finite=check_finite, **solver_kw)


def _with_labels(model, labels, guidance_scale, batch, cond=None, negative_cond=None):
    """`model` itself without labels and cond, else its (cached, per-thread) Conditioned wrapper
    holding the inputs and scale (`guidance.wrapper_for`)."""
    return wrapper_for(model, batch, labels, guidance_scale, cond, negative_cond)


_LOCK = threading.Lock()  # _DEFAULT
_DEFAULT = {}  # the loaded default model, per loader (tests replace the loader)


def _default_model():
    from . import models

    try:
        loader = models.load_default
    except AttributeError as e:  # pragma: no cover - the bundled model ships with the package
        raise RuntimeError(f"no model given and the default model is not available ({e})") from e
    with _LOCK:  # loaded once, whichever thread asks first
        if loader not in _DEFAULT:
            _DEFAULT.clear()
            _DEFAULT[loader] = loader()
        return _DEFAULT[loader]
