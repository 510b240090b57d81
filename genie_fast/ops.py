"""The single place that picks an implementation for each fused op.

Every op has a plain PyTorch reference (`<op>_ref`, the readable math, against which every
kernel is tested) and fused versions: `torch.ops.genie_fast.<op>_out` (C++ on the CPU, CUDA on
the GPU; csrc/; `schedule_table` keeps its plain name) and a Triton kernel (kernels/<op>.py). Solvers call the un-suffixed function
with a `backend`:
    "torch"   the reference (any device)
    "cpp"     the C++ CPU kernel (CPU tensors)
    "cuda"    the CUDA kernel (CUDA tensors; the extension built with its .cu sources)
    "triton"  the Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)
    "auto"    the fastest that works on the tensors' device: cuda > triton > torch on a GPU,
              cpp (else torch) on the CPU.
A backend that was asked for by name and cannot run raises an error saying why.

Every public op checks its arguments first, on the host, from tensor metadata alone (`_check_args`,
one helper for all ops and backends): kinds, shapes, dtypes, one device for every tensor (the
coefficient row and the weights too), and outputs that share memory with each other (an output
may alias an input). No value is read there: that would be a device sync per step and would break
CUDA graph capture. Non-finite coefficients are refused where they are made instead: `Plan` checks
its host grid, and `schedule_table` the times it is given on the CPU (finite, in (0, 1]).

The step ops take `out=`: preallocated contiguous outputs (a tuple in the order of the
returned tensors), which may be the inputs themselves (x_bar updated in place): every element
is read before it is written. A CUDA graph engine can so keep fixed buffers. The fused kernels
have only that form (`torch.ops.genie_fast.<op>_out`, the Triton launchers likewise): without
`out=` the outputs are allocated here, contiguous, and the same kernel writes them. The reference
backend allocates its own results (and copies them into `out=` when given).

`taylor_step` (explicit d eps/d gamma, used by genie_exact) stays a reference on every
backend: its step is one elementwise pass next to a forward-mode JVP through the network
(about four network evaluations, `solvers.JVP_NFE`), so a fused kernel would not be measurable.

Coefficients are read from a row of `schedule.coeff_table` (columns in
`schedule.COEFF_COLUMNS`) and a solver's own per-step weights from a small weight vector beside it
(layouts in `genie_fast.layout`), so a step never needs a host scalar or a host-device sync.
States (x_bar, x0) are float32 (float64 for float64 runs); eps, the head output and the next
network input x are in the network's dtype.
"""
from __future__ import annotations

import functools
import os

import torch

from ._ext import has_op
from .layout import (DPMPP_2M_A, DPMPP_2M_B, DPMPP_2M_WEIGHTS, MULTISTEP_D_SLOTS, MULTISTEP_TERMS,
                     MULTISTEP_WEIGHTS, MULTISTEP_X0_SLOTS)
from .schedule import COL, VPSchedule, check_schedule, coeff_table

__all__ = [
    "BACKENDS", "head_combine_ref", "available_backends", "check_backend", "schedule_table",
    "taylor_step_ref", "genie_step_ref", "ddim_step_ref", "denoise_step_ref", "dpmpp_2m_step_ref",
    "genie_multistep_step_ref", "MULTISTEP_WEIGHTS", "DPMPP_2M_WEIGHTS", "genie_multistep_step",
    "taylor_step", "genie_step", "ddim_step", "denoise_step", "dpmpp_2m_step",
]

BACKENDS = ("auto", "torch", "cpp", "triton", "cuda")


def _opmath(x_bar: torch.Tensor) -> torch.dtype:
    return torch.float64 if x_bar.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- references

def head_combine_ref(head_out: torch.Tensor, gamma) -> torch.Tensor:
    """d eps / d gamma from the GENIE head's raw output (B, 3C, ...) = [h1 | h2 | h3].

    -h1 / gamma + h2 gamma / (1 + gamma^2) + h3 / (gamma (1 + gamma^2)); gamma a float or a
    tensor broadcastable against h1 (e.g. shape (B, 1, 1, 1)).
    """
    if head_out.shape[1] % 3:
        raise ValueError(f"head output must have 3*C channels on dim 1, got shape {tuple(head_out.shape)}")
    h1, h2, h3 = head_out.chunk(3, dim=1)
    one_g2 = 1.0 + gamma * gamma
    return -h1 / gamma + h2 * (gamma / one_g2) + h3 / (gamma * one_g2)


def taylor_step_ref(x_bar, eps, deps, coeffs):
    """One truncated-Taylor step of the DDIM ODE d x_bar / d gamma = eps (GENIE eq. 9).

    x_bar_next = x_bar + h eps + h^2/2 deps  (deps=None: the Euler/DDIM step),
    x_next = x_bar_next / sqrt(1 + gamma_next^2), the next network input, in eps's dtype.
    """
    dt = _opmath(x_bar)
    c = coeffs.to(dt)
    x_bar_next = x_bar.to(dt) + c[COL["h"]] * eps.to(dt)
    if deps is not None:
        x_bar_next = x_bar_next + c[COL["half_h2"]] * deps.to(dt)
    x_next = (x_bar_next * c[COL["inv_scale_next"]]).to(eps.dtype)
    return x_bar_next.to(x_bar.dtype), x_next


def genie_step_ref(x_bar, eps, head_out, coeffs):
    """GENIE step from the head's raw output: combine [h1|h2|h3] at gamma_n, then Taylor step."""
    dt = _opmath(x_bar)
    c = coeffs.to(dt)
    h1, h2, h3 = head_out.to(dt).chunk(3, dim=1)
    deps = c[COL["w1"]] * h1 + c[COL["w2"]] * h2 + c[COL["w3"]] * h3
    return taylor_step_ref(x_bar, eps, deps, coeffs)


def ddim_step_ref(x_bar, eps, coeffs):
    """Euler step in gamma (= DDIM). With eps = x_T at t = 1 it is the analytical first step."""
    return taylor_step_ref(x_bar, eps, None, coeffs)


def denoise_step_ref(x_bar, eps, coeffs):
    """Final denoising at the END of step `coeffs`: x0 = x_bar - gamma_next * eps (state dtype)."""
    dt = _opmath(x_bar)
    return (x_bar.to(dt) - coeffs.to(dt)[COL["gamma_next"]] * eps.to(dt)).to(x_bar.dtype)


def dpmpp_2m_step_ref(x_bar, eps, x0_prev, weights, coeffs):
    """DPM-Solver++(2M) step (Lu et al. 2022, eq. for the multistep data-prediction solver).

    In x_bar = x / alpha it reads x_bar_next = r x_bar + (1 - r) (a x0 + b x0_prev) with
    x0 = x_bar - gamma eps, r = gamma_next / gamma (column dpm_r of the row `coeffs`) and the
    step's solver weights [a, b] = `weights` (`layout.DPMPP_2M_WEIGHTS` values, from the log-SNR
    step ratio: `solvers.multistep._dpmpp_2m_weights`).
    Returns (x_bar_next, x_next, x0); x0 is the next step's x0_prev (state dtype).
    """
    dt = _opmath(x_bar)
    c, w = coeffs.to(dt), weights.to(dt)
    x0 = x_bar.to(dt) - c[COL["gamma"]] * eps.to(dt)
    d = w[DPMPP_2M_A] * x0 + w[DPMPP_2M_B] * x0_prev.to(dt)
    x_bar_next = c[COL["dpm_r"]] * x_bar.to(dt) + (1.0 - c[COL["dpm_r"]]) * d
    x_next = (x_bar_next * c[COL["inv_scale_next"]]).to(eps.dtype)
    return x_bar_next.to(x_bar.dtype), x_next, x0.to(x_bar.dtype)


def genie_multistep_step_ref(x_bar, x_bar_eval, eps, head_out, x0_hist, d_hist, weights, coeffs):
    """One `genie_multistep` network evaluation's worth of update: the corrector of the step that
    ended at the evaluation point, then the predictor of the step that starts there.

    At the evaluation point (coefficient row `coeffs`: gamma and the head weights w1..w3):
        x0 = x_bar_eval - gamma eps                       (data prediction)
        d  = gamma^2 (w1 h1 + w2 h2 + w3 h3)              (d x0 / d lambda, from the raw head)
    With the terms T = [base, x0, d, X_0, X_1, X_2, D_0, D_1] (X_k = x0_hist[k], D_k = d_hist[k]:
    earlier data predictions and derivatives in ring-buffer slots) and weights w (17 values):
        x_bar_next = sum_i w[i] T_i          with base = x_bar       (corrector)
        x_bar_pred = sum_i w[8 + i] T_i      with base = x_bar_next  (predictor)
        x_pred     = x_bar_pred * w[16]      (the next network input, in eps's dtype)
    Returns (x_bar_next, x_bar_pred, x_pred, x0, d); states in x_bar's dtype. Outputs may alias
    the inputs (x0 and d usually go into the history slot whose weights are 0).
    """
    dt = _opmath(x_bar)
    c, w = coeffs.to(dt), weights.to(dt)
    g = c[COL["gamma"]]
    h1, h2, h3 = head_out.to(dt).chunk(3, dim=1)
    x0 = x_bar_eval.to(dt) - g * eps.to(dt)
    d = (g * g) * (c[COL["w1"]] * h1 + c[COL["w2"]] * h2 + c[COL["w3"]] * h3)
    terms = [x0, d, *x0_hist.to(dt).unbind(0), *d_hist.to(dt).unbind(0)]
    k = MULTISTEP_TERMS
    x_bar_next = w[0] * x_bar.to(dt)
    for i, term in enumerate(terms, 1):
        x_bar_next = x_bar_next + w[i] * term
    x_bar_pred = w[k] * x_bar_next
    for i, term in enumerate(terms, 1):
        x_bar_pred = x_bar_pred + w[k + i] * term
    x_pred = (x_bar_pred * w[2 * k]).to(eps.dtype)
    st = x_bar.dtype
    return x_bar_next.to(st), x_bar_pred.to(st), x_pred, x0.to(st), d.to(st)


# --------------------------------------------------------------------------- dispatch

_STATE_DTYPES = (torch.float32, torch.float64)
_NET_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_WEIGHT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_OUTS = {  # op -> its outputs: (name, the argument whose dtype it takes)
    "genie_step": (("x_bar_next", "x_bar"), ("x_next", "eps")),
    "ddim_step": (("x_bar_next", "x_bar"), ("x_next", "eps")),
    "denoise_step": (("x0", "x_bar"),),
    "dpmpp_2m_step": (("x_bar_next", "x_bar"), ("x_next", "eps"), ("x0", "x_bar")),
    "genie_multistep_step": (("x_bar_next", "x_bar"), ("x_bar_pred", "x_bar"), ("x_pred", "eps"), ("x0", "x_bar"),
                             ("d", "x_bar")),
}


def _dtype_of(name: str, t: torch.Tensor, x_bar: torch.Tensor, eps: torch.Tensor):
    """The dtypes argument `name` may have (a tuple), or the one it must have (a dtype)."""
    if name == "x_bar":
        return _STATE_DTYPES
    if name == "eps":
        return (torch.float64,) if x_bar.dtype == torch.float64 else _NET_DTYPES
    if name == "head_out":
        return eps.dtype
    if name in ("coeffs",):
        return _STATE_DTYPES
    if name in ("weights", "deps"):
        return _WEIGHT_DTYPES
    return x_bar.dtype  # x0_prev, x_bar_eval, x0_hist, d_hist: the state's


def _shape_of(name: str, x_bar: torch.Tensor, n_weights: int | None):
    """The shape argument `name` must have (None: checked apart)."""
    s = tuple(x_bar.shape)
    if name == "head_out":
        return (s[0], 3 * s[1], *s[2:])
    if name == "x0_hist":
        return (MULTISTEP_X0_SLOTS, *s)
    if name == "d_hist":
        return (MULTISTEP_D_SLOTS, *s)
    if name == "weights":
        return (n_weights,)
    if name == "coeffs":
        return None
    return s


def _check_args(op: str, named: dict, out=None, n_weights: int | None = None) -> tuple | None:
    """The one argument check of every public step op, on the host, from tensor metadata only (no
    value is read: no device sync, nothing a CUDA graph capture refuses). `named`: the op's tensor
    arguments by name, in its argument order (None for an absent optional one; x_bar and eps are
    checked first). Refuses a non-tensor,
    a wrong shape or dtype, a tensor on another device than x_bar (a coefficient row on `meta`
    next to CPU tensors would run the fake kernel and return uninitialised memory), and outputs
    `out` of the wrong number, shape, dtype, device or layout, or sharing memory with each other
    (an output aliasing an input is allowed: each element is read before it is written). Returns
    the outputs as a tuple (None without out=)."""
    for name, t in named.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    x_bar, eps = named["x_bar"], named["eps"]
    if x_bar.dim() < 2:
        raise ValueError(f"{op}: x_bar must be (B, C, ...), got shape {tuple(x_bar.shape)}")
    device = x_bar.device
    for name in ("x_bar", "eps", *(k for k in named if k not in ("x_bar", "eps"))):
        t = named[name]
        if t is None:
            continue
        want = _shape_of(name, x_bar, n_weights)
        if name == "coeffs":
            if t.dim() != 1 or t.numel() < len(COL):
                raise ValueError(f"{op}: coeffs must be one row of coeff_table ({len(COL)} values), got shape "
                                 f"{tuple(t.shape)}")
        elif tuple(t.shape) != want:
            what = {"eps": "have the shape of x_bar", "head_out": f"have shape {want} (3*C channels [h1|h2|h3])",
                    "weights": f"be {n_weights} values"}.get(name, f"have shape {want}")
            raise ValueError(f"{op}: {name} must {what}, got shape {tuple(t.shape)}")
        dtypes = _dtype_of(name, t, x_bar, eps)
        if t.dtype not in (dtypes if isinstance(dtypes, tuple) else (dtypes,)):
            allowed = ", ".join(str(d).replace("torch.", "") for d in (dtypes if isinstance(dtypes, tuple) else (dtypes,)))
            note = " (a float64 state needs float64 network outputs)" if name == "eps" and x_bar.dtype == torch.float64 else ""
            raise TypeError(f"{op}: {name} dtype {str(t.dtype).replace('torch.', '')} is not allowed here: "
                            f"it must be {allowed}{note}")
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device}, x_bar on {device}: every tensor of a step "
                             "(coefficient rows and weights too) must be on the same device")
    if out is None:
        return None
    outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
    spec = _OUTS[op]
    if len(outs) != len(spec):
        raise ValueError(f"{op}: out must hold {len(spec)} tensors ({', '.join(n for n, _ in spec)}), got {len(outs)}")
    for o, (name, like) in zip(outs, spec):
        dtype = named[like].dtype
        if not isinstance(o, torch.Tensor):
            raise TypeError(f"{op}: output {name} must be a tensor, got {type(o).__name__}")
        if o.shape != x_bar.shape or o.dtype != dtype or o.device != device:
            raise ValueError(f"{op}: output {name} must be {tuple(x_bar.shape)} {dtype} on {device}, got "
                             f"{tuple(o.shape)} {o.dtype} on {o.device}")
        if not o.is_contiguous():
            raise ValueError(f"{op}: output {name} must be contiguous (row-major); channels_last or strided "
                             "outputs are not supported")
    for i in range(len(outs)):
        for j in range(i):
            if _overlap(outs[i], outs[j]):
                raise ValueError(f"{op}: outputs {spec[j][0]} and {spec[i][0]} share memory; each output needs its "
                                 "own buffer (an output may alias an input, not another output)")
    return outs


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two contiguous tensors share any memory (storage identity where there is no memory)."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    sa, sb = a.untyped_storage(), b.untyped_storage()
    if a.device.type == "meta" or sa.data_ptr() == 0 or sb.data_ptr() == 0:
        return sa._cdata == sb._cdata
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


@functools.lru_cache(maxsize=None)
def _triton_error(device_type: str) -> str | None:
    """Why Triton cannot run on this device type, or None when it can."""
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before genie_fast.kernels is imported)"
    if device_type not in ("cpu", "cuda"):
        return f"Triton kernels here target CUDA devices, not {device_type}"
    try:
        from . import kernels  # noqa: F401  (kernels/, installed as genie_fast.kernels)
    except ImportError as e:
        return f"Triton kernels cannot be imported ({e}; pip install 'genie_fast[triton]')"
    return None


def check_backend(backend: str, device) -> str:
    """Refuse, before any work, a backend that is unknown or cannot run on `device` at all (a
    sampling call checks this first; each op checks its own kernel when it runs)."""
    _check_backend_device(backend, torch.device(device).type, "sampling")
    return backend


def _check_backend_device(backend: str, device_type: str, op: str):
    """Refuse a named backend that cannot run on this device type at all, whatever the op."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "cpp" and device_type != "cpu":
        raise ValueError(f"backend 'cpp' runs on the CPU, but the tensors are on {device_type}")
    if backend == "cuda" and device_type != "cuda":
        raise ValueError(f"backend 'cuda' runs on CUDA tensors, but the tensors are on {device_type}")
    if backend == "triton":
        why = _triton_error(device_type)
        if why is not None:
            raise RuntimeError(f"backend 'triton' for {op} is unavailable: {why}")


@functools.lru_cache(maxsize=None)
def _pick_cached(op: str, device_type: str, backend: str) -> str:
    _check_backend_device(backend, device_type, op)
    if backend == "auto":
        if device_type == "cuda":
            if has_op(op, "cuda"):
                return "cuda"
            return "triton" if _triton_error("cuda") is None else "torch"
        return "cpp" if device_type == "cpu" and has_op(op, "cpu") else "torch"
    if backend == "cpp" and not has_op(op, "cpu"):
        raise RuntimeError(f"backend 'cpp' asked for, but genie_fast._C (op {op}) is not built; "
                           "rebuild with `pip install --no-build-isolation -e .`")
    if backend == "cuda" and not has_op(op, "cuda"):
        raise RuntimeError(f"backend 'cuda' asked for, but genie_fast._C has no CUDA kernel for {op}: "
                           "build it with a CUDA torch and nvcc (GENIE_FAST_CUDA=ON)")
    return backend


def _pick(op: str, device: torch.device, backend: str) -> str:
    """The backend that runs `op` on `device` (cached: one dict lookup per step)."""
    try:
        return _pick_cached(op, device.type, backend)
    except TypeError:  # an unhashable backend (a list): named as any other unknown one
        _check_backend_device(backend, device.type, op)
        raise


def available_backends(op: str, device) -> list[str]:
    """The named backends that can run `op` on `device` (for tests and benchmarks)."""
    device = torch.device(device)
    found = []
    for b in ("torch", "cpp", "cuda", "triton"):
        try:
            _pick(op, device, b)
            found.append(b)
        except (ValueError, RuntimeError):
            pass
    return found


def _triton():
    from . import kernels  # imported lazily: TRITON_INTERPRET must be set before the kernels exist
    return kernels


def _copy_out(results, outs):
    """The torch backend with out=: compute, then copy (inputs may alias the outputs; `outs` checked)."""
    if outs is None:
        return results
    single = isinstance(results, torch.Tensor)
    for r, o in zip((results,) if single else results, outs):
        o.copy_(r)
    return outs[0] if single else outs


def taylor_step(x_bar, eps, deps, coeffs, backend: str = "auto"):
    """Taylor step with an explicit d eps/d gamma (exact JVP or a deps callable).

    Not fused (see the module docstring): every backend runs the reference, but a named backend
    that cannot run on the tensors' device is refused as for the fused ops.
    """
    _check_args("taylor_step", {"x_bar": x_bar, "eps": eps, "deps": deps, "coeffs": coeffs})
    _check_backend_device(backend, x_bar.device.type, "taylor_step")
    return taylor_step_ref(x_bar, eps, deps, coeffs)


# op -> its reference: the one dispatch table of the fused step ops (outputs in `_OUTS`).
_STEP_OPS = {
    "genie_step": genie_step_ref,
    "ddim_step": ddim_step_ref,
    "denoise_step": denoise_step_ref,
    "dpmpp_2m_step": dpmpp_2m_step_ref,
    "genie_multistep_step": genie_multistep_step_ref,
}


def _run_step(op: str, named: dict, backend: str, out, n_weights: int | None = None):
    """Checks (`_check_args`), then runs fused step `op` on its tensors `named` (in the op's argument
    order, coeffs last) with `backend`, into `out`; without `out`, into fresh contiguous outputs
    allocated here (the kernels have only the out form)."""
    outs = _check_args(op, named, out, n_weights)
    args = tuple(named.values())
    x_bar = args[0]
    b = _pick(op, x_bar.device, backend)
    if b == "torch":
        return _copy_out(_STEP_OPS[op](*args), outs)
    if outs is None:
        outs = tuple(torch.empty(x_bar.shape, dtype=named[like].dtype, device=x_bar.device)
                     for _, like in _OUTS[op])
    if b == "triton":
        getattr(_triton(), op)(*args, *outs)
    else:
        getattr(torch.ops.genie_fast, op + "_out")(*args, *outs)
    return outs[0] if len(outs) == 1 else outs


def genie_step(x_bar, eps, head_out, coeffs, backend: str = "auto", out=None):
    """Fused GENIE step; see `genie_step_ref`. Returns (x_bar_next, x_next)."""
    return _run_step("genie_step", {"x_bar": x_bar, "eps": eps, "head_out": head_out, "coeffs": coeffs},
                     backend, out)


def ddim_step(x_bar, eps, coeffs, backend: str = "auto", out=None):
    """DDIM / AFS step; see `ddim_step_ref`. Returns (x_bar_next, x_next)."""
    return _run_step("ddim_step", {"x_bar": x_bar, "eps": eps, "coeffs": coeffs}, backend, out)


def denoise_step(x_bar, eps, coeffs, backend: str = "auto", out=None):
    """Final denoising step; see `denoise_step_ref`. Returns x0."""
    return _run_step("denoise_step", {"x_bar": x_bar, "eps": eps, "coeffs": coeffs}, backend, out)


def dpmpp_2m_step(x_bar, eps, x0_prev, weights, coeffs, backend: str = "auto", out=None):
    """DPM-Solver++(2M) step with the step's weights [a, b]; see `dpmpp_2m_step_ref`.
    Returns (x_bar_next, x_next, x0)."""
    return _run_step("dpmpp_2m_step", {"x_bar": x_bar, "eps": eps, "x0_prev": x0_prev, "weights": weights,
                                       "coeffs": coeffs}, backend, out, DPMPP_2M_WEIGHTS)


def genie_multistep_step(x_bar, x_bar_eval, eps, head_out, x0_hist, d_hist, weights, coeffs,
                         backend: str = "auto", out=None):
    """genie_multistep's corrector + predictor; see `genie_multistep_step_ref`.
    Returns (x_bar_next, x_bar_pred, x_pred, x0, d)."""
    return _run_step("genie_multistep_step",
                     {"x_bar": x_bar, "x_bar_eval": x_bar_eval, "eps": eps, "head_out": head_out, "x0_hist": x0_hist,
                      "d_hist": d_hist, "weights": weights, "coeffs": coeffs}, backend, out, MULTISTEP_WEIGHTS)


def schedule_table(schedule, ts: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """`coeff_table(schedule, ts)` computed on ts's device: (N, len(COEFF_COLUMNS)) float64.

    For a VPSchedule the fused kernels evaluate its closed forms on the device from the grid
    ts (a device tensor of N + 1 times), with no host round trip. Times on the CPU are checked
    (finite, in (0, 1]); times on a device are not read (no sync: `Plan` checks its host grid). Other schedules (e.g.
    DiscreteVPSchedule, whose alpha is a host table) get the host table copied to the device,
    which reads ts back to the host once; do this before a sampling loop, never inside one.
    """
    check_schedule(schedule)
    if not isinstance(ts, torch.Tensor):
        raise TypeError(f"ts must be a tensor of times on the sampling device, got {type(ts).__name__}")
    if ts.dim() != 1 or ts.numel() < 2:
        raise ValueError(f"ts must be a 1-D grid of at least two times, got shape {tuple(ts.shape)}")
    if ts.dtype not in _STATE_DTYPES:
        raise TypeError(f"ts must be float32 or float64 times, got {ts.dtype}")
    b = _pick("schedule_table", ts.device, backend)
    if ts.device.type == "cpu":  # host times are read here for free; device times are never read back
        bad = ~(torch.isfinite(ts) & (ts > 0) & (ts <= 1))
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"ts must hold finite times in (0, 1], got {float(ts[i])} at index {i} (t = 0 "
                             "or a NaN would give NaN/inf coefficients)")
    if b == "torch" or type(schedule) is not VPSchedule:
        return coeff_table(schedule, ts).to(ts.device)
    if b == "triton":
        return _triton().schedule_table(ts, schedule.beta_min, schedule.beta_d)
    return torch.ops.genie_fast.schedule_table(ts, schedule.beta_min, schedule.beta_d)
