"""The sampling engine: every solver of `genie_fast.solvers`, one CUDA graph per key, a
half-precision network and head around a float32 ODE state.

    engine = SamplingEngine(model)                # model: a GenieModel or any eps model
    x0, nfe = engine.sample(noise)                # the defaults of genie_fast.sample
    x0, nfe = engine.sample(n=16, solver="heun", steps=5)

`genie_fast.sample()` runs through the engine on every device (`engine_for(model, device)`).

What runs where
  * The loop is the solver itself: the engine calls ``SOLVERS[solver]`` (all nine, and any solver
    added there later, with its keyword arguments in the key) with a `solvers.Plan` it built once
    per key. On CUDA it captures that whole call (every network and head call, genie_exact's JVP,
    every step, the final denoising) into ONE CUDA graph per key; elsewhere it runs the same call
    eagerly (the C++ step ops on the CPU).
  * Precision: the ODE state and the samples are in ``dtype`` (float32 by default; float64 for
    accuracy work). The network runs in ``net_dtype``: fp16 by default on CUDA for a module with
    floating-point weights (bf16, fp32, fp64 selectable), else the state's dtype; a half-precision
    network on the CPU is refused (ATen's CPU half convolutions are slow and not what anyone
    measures). What must stay float32 for accuracy does so without extra kernels: the U-Net's time
    embedding sinusoid is computed in float32; GroupNorm's mean and variance are accumulated in
    float32 by ATen's kernels for fp16/bf16 inputs (`tests/test_engine.py` checks it on data a
    half-precision accumulation would ruin); the fused attention kernels keep the softmax max and
    sum in float32 (the U-Net passes 4-D (B, heads, L, D) inputs, which they need); the head's
    [h1|h2|h3] are combined in float32 inside the fused step.
  * The model on the device (``device`` means the same for every solver and every model):
    - an ``nn.Module`` whose floating-point parameters and buffers already all live on the device in
      ``net_dtype`` is used as is. The engine then reads its tensors live: in-place changes
      (optimizer steps, ``load_state_dict``, buffers a wrapper updates between calls) reach the
      next eager run and the next graph replay. Its weights-changed test is O(1): the storage of
      its first floating-point tensor (``model.half()``, ``.to()`` or ``load_state_dict(assign=True)``
      replace every tensor, and a replaced storage would leave a graph reading freed memory): on a
      change every graph and copy is dropped and made again.
    - any other module is copied to the device once per ``net_dtype`` (tensor by tensor; floating
      parameters and buffers converted, integer buffers kept), in the model's own train/eval mode.
      Before every call the version counters of the model's parameters and buffers are compared
      with those at the last copy (one attribute read per tensor: about 20 us for the bundled
      model's 182 tensors, 50-75 us for the 920 of the DDPM++ deep U-Net on this project's CPU) and
      changed tensors are copied into the engine's copies in place (same addresses: graphs stay
      valid). So a model whose buffers are updated in place between calls (e.g. a guidance wrapper's
      labels and scale) replays the same graph with the new values. After replacing parameter
      objects (``load_state_dict(assign=True)`` on a copied model), call `refresh()`.
    - a plain callable is called as is, with tensors on the device.
  * A model may declare ``evals_per_call`` (network evaluations per call and sample, default 1,
    e.g. 2 for a guidance wrapper on a doubled batch): NFE budgets and the returned NFE count it.
  * Key rule (`GraphKey`): batch, image shape, state and network dtypes, solver and its keyword
    arguments, the grid's times, schedule, AFS, denoising, backend, device, and for float32
    networks captured in a graph the TF32 flags (a graph captured with TF32 replays TF32 kernels).
    Any change is a cache miss that captures a new graph (never a stale one); the cache keeps the
    ``max_graphs`` most recently used graphs. The arguments of a call are memoised to their
    (key, plan, NFE), so a repeated call builds no grid and reads no time on the host.
  * Graphs: before capture the solver runs ``warmup`` times on a side stream (cuDNN/cuBLAS
    handles, Triton autotuning, and the plan's solver tables are made there; the last warm-up run
    is checked for host syncs). Static buffers: the input x_T and the output, owned by the cache
    entry; everything in between lives in one memory pool shared by all graphs of the engine
    (replays are serialised on the caller's stream and each output is cloned before the next:
    use one engine from one stream at a time). A model that cannot be captured (host syncs such
    as ``.item()``, or anything CUDA refuses during capture) runs eagerly instead, with one
    warning per engine. (Data-dependent Python control flow cannot be detected: a graph replays
    the path taken at capture.)
  * Noise is drawn outside the graph on the CPU in float32 (`make_noise` for a batch seed,
    `seed_noise` for per-image seeds: the same x_T on every device) and copied into the static input.
  * Finite results: a call checks once, after the loop, that its samples are finite (one host
    sync; ``check_finite=False`` skips it). If not, it re-runs eagerly with a check at every
    network call (`solvers.find_nonfinite`) and raises `NonFiniteError` naming the first step where
    the state or the model's output stopped being finite.
  * Inference mode: the engine's persistent tensors (weight copies, plans, graph buffers) are
    always made with inference mode off, so a first call under ``torch.inference_mode()`` does not
    break later calls outside it.

NVTX (see `genie_fast.profiling`): ``sample`` around each call; eager: ``step`` per step with
``network`` per evaluation inside (``head`` nested for a module with a ``head``); graph: one
``replay`` range per launch (``warmup`` and ``capture`` once per key).
"""
from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import operator
import time
import warnings
import weakref
from collections.abc import Sequence

import torch
from torch import nn

from . import ops
from .checks import check_device, check_flag, check_int
from .profiling import nvtx_range, pop, push
from .schedule import VPSchedule, time_grid
from .solvers import (AUTO_AFS, DEFAULT_AFS, DEFAULT_NFE, DEFAULT_SOLVER, SOLVERS, NonFiniteError, Plan, evals_per_call,
                      find_nonfinite, grid_for, nfe_of, steps_for_nfe)

__all__ = ["SamplingEngine", "GraphKey", "ENGINE_SOLVERS", "DTYPES", "draw_noise", "make_noise", "seed_noise",
           "NonFiniteError", "engine_for", "no_tf32"]

ENGINE_SOLVERS = tuple(SOLVERS)  # every solver runs in the engine (kept for scripts that list them)
DTYPES = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
          "fp64": torch.float64, "float64": torch.float64, "double": torch.float64}
_HALF = (torch.float16, torch.bfloat16)
_VERSION = operator.attrgetter("_version")


def _as_dtype(dtype, allowed, what) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown {what} {dtype!r}; choose one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype not in allowed:
        raise ValueError(f"{what} must be one of {[str(d).replace('torch.', '') for d in allowed]}, got {dtype}")
    return dtype


# torch's CPU generator (mt19937) keeps only the low 32 bits of a seed: 2**32 would repeat seed 0.
SEED_LIMIT = 2 ** 32


def _check_seed(name: str, seed) -> int:
    seed = check_int(name, seed, 0)
    if seed >= SEED_LIMIT:
        raise ValueError(f"{name} must be below 2**32 (torch's CPU generator keeps 32 bits of a seed: "
                         f"{seed} would draw the noise of {seed % SEED_LIMIT}), got {seed}")
    return seed


def seed_noise(seeds, shape, dtype=torch.float32, device=None) -> torch.Tensor:
    """(len(seeds), *shape) standard normal noise, row k drawn in float32 on the CPU from its own
    ``torch.Generator().manual_seed(seeds[k])``: the one definition of a per-image seed's x_T
    (``sample(seeds=)`` and ``genie-fast generate``), the same whatever the batch around it, its
    order, or the device. Seeds are ints in [0, 2**32)."""
    seeds = [_check_seed("seeds", s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    rows = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(s), dtype=torch.float32)
            for s in seeds]
    return torch.stack(rows).to(device=device, dtype=dtype)


def make_noise(n: int, shape, seed: int = 0, dtype=torch.float32, device=None) -> torch.Tensor:
    """(n, *shape) standard normal noise of batch seed `seed` (an int in [0, 2**32)): one CPU
    generator seeded `seed` draws the samples one after another (float32), so sample i does not
    depend on n or the device, and two seeds' batches share no sample (different streams). The
    first sample of seed s is ``seed_noise([s])``, the image of per-image seed s."""
    n, generator = check_int("n", n, 1), torch.Generator().manual_seed(_check_seed("seed", seed))
    rows = [torch.randn(tuple(shape), generator=generator, dtype=torch.float32) for _ in range(n)]
    return torch.stack(rows).to(device=device, dtype=dtype)


def draw_noise(n: int, shape, seed: int = 0, device=None, dtype=torch.float32) -> torch.Tensor:
    """x_T ~ N(0, I) of (n, *shape) by `make_noise` (drawn in float32), on `device` in `dtype`."""
    return make_noise(check_int("n", n, 1), tuple(shape), seed, dtype=dtype, device=device)


@contextlib.contextmanager
def no_tf32():
    """True float32 convolutions inside (for fp32 references): cuDNN's TF32, on by default in
    PyTorch, is switched off and restored after. cuBLAS matmuls are left alone (no TF32 unless the
    user asked for it). Uses the legacy flag, which keeps torch's conv/rnn precision flags
    consistent; where the user set them apart with the new `fp32_precision` API, that API."""
    cudnn = torch.backends.cudnn
    try:
        old = cudnn.allow_tf32
    except RuntimeError:  # the new API was used to set conv and rnn apart: stay with it
        old_conv = cudnn.conv.fp32_precision
        cudnn.conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            cudnn.conv.fp32_precision = old_conv
        return
    cudnn.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32 = old


def _tf32_flags() -> tuple:
    """What decides whether float32 matmuls and convolutions run as TF32 (part of an fp32 graph's key)."""
    b = torch.backends
    try:
        return (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision)
    except (AttributeError, RuntimeError):  # torch without the fp32_precision API
        return (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)


# Encoding with ipndm diverges below this many steps (bench/RESULTS.md, "Encoding with every solver").
IPNDM_MIN_ENCODE_STEPS = 40


@dataclasses.dataclass(frozen=True)
class GraphKey:
    """Everything a captured graph depends on; any change captures a new graph."""

    batch: int
    image_shape: tuple
    dtype: torch.dtype       # the ODE state's and the samples'
    net_dtype: torch.dtype   # the network's
    solver: str
    ts: tuple                # the N + 1 grid times, float64 values
    schedule: object         # compared by identity; the key keeps it alive, so an id is never reused
    afs: bool
    denoise: bool
    backend: str
    device: str
    kw: tuple = ()           # the solver's keyword arguments, sorted (name, value) pairs
    tf32: tuple | None = None  # TF32 flags, for float32 networks in a graph only


@dataclasses.dataclass
class _Entry:
    """A cached graph and its static buffers (input noise, output sample), kept alive together."""

    graph: "torch.cuda.CUDAGraph"
    x_in: torch.Tensor
    out: torch.Tensor
    plan: Plan
    capture_s: float


class SamplingEngine:
    """Sampling with every solver for one model on one device: CUDA graphs, half-precision network.

    model: a `GenieModel` (``eps_and_head``) or any eps model ``model(x, t) -> eps``; see the module
    docstring for how it gets to the device. device: default CUDA when available, else the CPU.
    net_dtype: the network's default dtype for this engine (None: fp16 on CUDA for a module with
    floating-point weights, else the state's dtype). schedule: default the model's ``.schedule``,
    else `VPSchedule()`. backend: of the fused step ops (`genie_fast.ops`). use_graphs: default True
    on CUDA. max_graphs: how many captured graphs the LRU cache keeps. warmup: eager runs before a
    capture.
    """

    def __init__(self, model, *, device=None, net_dtype=None, schedule=None, backend: str = "auto",
                 use_graphs: bool | None = None, max_graphs: int = 8, warmup: int = 2,
                 _keep_alive: bool = True):
        if model is None or not callable(model):
            raise TypeError(f"model must be a callable eps model, got {type(model).__name__}")
        self.device = check_device(device if device is not None else
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.net_dtype = None if net_dtype is None else self._check_net_dtype(net_dtype)
        self.backend = ops.check_backend(backend, self.device)  # a named backend that cannot run here raises
        if use_graphs is None:
            use_graphs = self.device.type == "cuda"
        if use_graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the engine runs on {self.device}")
        self.use_graphs = bool(use_graphs)
        if int(max_graphs) != max_graphs or max_graphs < 1:
            raise ValueError(f"max_graphs must be a positive integer, got {max_graphs}")
        if int(warmup) != warmup or warmup < 1:
            raise ValueError(f"warmup must be a positive integer (capture needs a warm-up run), got {warmup}")
        self.max_graphs, self.warmup = int(max_graphs), int(warmup)
        self.schedule = schedule if schedule is not None else getattr(model, "schedule", None) or VPSchedule()

        self._model_ref = weakref.ref(model) if _is_weakrefable(model) else (lambda m=model: m)
        self._model_strong = model if _keep_alive else None
        self._nets: dict[torch.dtype, object] = {}      # net_dtype -> the model as the engine runs it
        self._as_is: dict[torch.dtype, tuple] = {}      # net_dtype -> (probe tensor, its data_ptr) of an as-is model
        self._copies: dict[torch.dtype, list] = {}      # net_dtype -> a copy's tensors, aligned with _sources
        self._sources = None                            # the model's parameters and buffers (copies only)
        self._versions = None                           # their version counters at the last copy
        self._memo: dict = {}                           # call arguments -> (GraphKey, Plan, nfe)
        self._plans: collections.OrderedDict[GraphKey, Plan] = collections.OrderedDict()
        self._graphs: collections.OrderedDict[GraphKey, _Entry] = collections.OrderedDict()
        self._eager_keys: set[GraphKey] = set()
        self._pool = None
        self._stream = None
        self._warned = False
        self.stats = collections.Counter()              # captures, replays, eager_runs, evictions, ...

    # ------------------------------------------------------------------ dtypes
    def _check_net_dtype(self, net_dtype) -> torch.dtype:
        dtype = _as_dtype(net_dtype, (torch.float16, torch.bfloat16, torch.float32, torch.float64), "net_dtype")
        if dtype in _HALF and self.device.type == "cpu":
            raise ValueError(f"a {dtype} network on the CPU is refused (ATen's CPU half-precision convolutions "
                             "are slow and not what this library measures): use net_dtype=float32 there, "
                             "half precision on a GPU")
        return dtype

    def _resolve_net_dtype(self, net_dtype, state_dtype) -> torch.dtype:
        if net_dtype is None:
            net_dtype = self.net_dtype
        if net_dtype is None:  # half precision is for networks on a GPU; analytic models keep the state's
            if state_dtype == torch.float32 and self.device.type == "cuda" and _has_float_weights(self.model):
                return torch.float16
            return state_dtype
        net_dtype = self._check_net_dtype(net_dtype)
        if state_dtype == torch.float64 and net_dtype != torch.float64:
            raise ValueError(f"a float64 state needs a float64 network (the step kernels take float64 network "
                             f"outputs with a float64 state), got net_dtype={net_dtype}")
        return net_dtype

    # ------------------------------------------------------------------ weights
    @property
    def model(self):
        m = self._model_ref()
        if m is None:
            raise RuntimeError("the engine's model has been garbage-collected")
        return m

    def network(self, net_dtype=None):
        """The model as the engine runs it in `net_dtype` on the engine's device (module docstring)."""
        model = self.model
        if not isinstance(model, nn.Module):
            return model  # a plain callable: its own dtype and device handling
        net_dtype = self._resolve_net_dtype(net_dtype, torch.float32)
        net = self._nets.get(net_dtype)
        if net is None:
            with torch.inference_mode(False), torch.no_grad():
                net = self._nets[net_dtype] = self._place(model, net_dtype)
        return net

    def _place(self, model: nn.Module, net_dtype):
        tensors = [*model.parameters(), *model.buffers()]
        floating = [t for t in tensors if t.is_floating_point()]
        if all(t.device == self.device and t.dtype == net_dtype for t in floating):
            if floating:
                self._as_is[net_dtype] = (floating[0], floating[0].data_ptr())
            return model
        if self._sources is None:
            self._sources = tensors
            self._versions = list(map(_VERSION, tensors))
        net = _converted_copy(model, self.device, net_dtype)
        copied = [*net.parameters(), *net.buffers()]
        if len(copied) != len(self._sources):
            raise RuntimeError("copying the model changed its set of parameters and buffers")
        self._copies[net_dtype] = copied
        return net

    def _sync_weights(self):
        """Keep the engine's view of the weights current, before every call (module docstring)."""
        for dtype, (probe, ptr) in self._as_is.items():
            if probe.data_ptr() != ptr or probe.dtype != dtype or probe.device != self.device:
                self.refresh()
                self.stats["refreshes"] += 1
                return
        if self._sources is None:
            return
        versions = list(map(_VERSION, self._sources))
        if versions != self._versions:
            with torch.inference_mode(False), torch.no_grad():
                for copied in self._copies.values():
                    for dst, src, v, v_old in zip(copied, self._sources, versions, self._versions):
                        if v != v_old:
                            dst.copy_(src)
            self._versions = versions
            self.stats["weight_refreshes"] += 1

    def refresh(self):
        """Forget the weight copies and every graph (after replacing the model's parameter objects)."""
        self.clear()
        self._nets.clear()
        self._as_is.clear()
        self._copies.clear()
        self._sources = self._versions = None

    # ------------------------------------------------------------------ keys, plans and cache
    def _shape(self, shape) -> tuple | None:
        """The image shape of a call: `shape` (checked against the model's channel count) or the model's."""
        own = getattr(self.model, "image_shape", None)
        if shape is None:
            return None if own is None else tuple(own)
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or not shape:
            raise TypeError(f"shape must be a tuple of ints (C, H, W), got {shape!r}")
        shape = tuple(check_int("shape", d, 1) for d in shape)
        if own is not None and shape[0] != tuple(own)[0]:
            raise ValueError(f"shape {shape} has {shape[0]} channel(s), the model takes {tuple(own)[0]} "
                             f"(its image_shape is {tuple(own)})")
        return shape

    def _state_noise(self, noise, n, shape, seed, dtype, seeds=None) -> torch.Tensor:
        """x_T on the device in the state dtype: the given noise, or n samples of batch seed `seed`,
        or one sample per per-image seed of `seeds` (`seed_noise`)."""
        if dtype is not None:
            dtype = _as_dtype(dtype, (torch.float32, torch.float64), "dtype (the ODE state's and the samples'; "
                              "the network's precision is net_dtype)")
        want = self._shape(shape)
        if seeds is not None:
            if noise is not None or seed != 0:
                raise ValueError("seeds= gives every sample its own seed: give it without noise= and seed=")
            if isinstance(seeds, (str, bytes)) or not isinstance(seeds, (Sequence, range, torch.Tensor)):
                raise TypeError(f"seeds must be a sequence of ints, got {type(seeds).__name__}")
            seeds = seeds.tolist() if isinstance(seeds, torch.Tensor) else list(seeds)
            if n is not None and n != len(seeds):
                raise ValueError(f"n={n} disagrees with the {len(seeds)} seeds given")
            return seed_noise(seeds, want if want is not None else _image_shape(self.model), dtype or torch.float32,
                              self.device)
        if noise is None:
            if n is None:
                raise ValueError("give noise=, or n= a positive number of samples (and optionally shape and "
                                 "seed), or seeds=")
            return draw_noise(check_int("n", n, 1), want if want is not None else _image_shape(self.model), seed,
                              self.device, dtype or torch.float32)
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
            raise TypeError(f"noise must be a floating-point tensor, got {type(noise).__name__}"
                            + (f" of dtype {noise.dtype}" if isinstance(noise, torch.Tensor) else ""))
        if noise.dim() < 2 or noise.shape[0] < 1 or noise.numel() == 0:
            raise ValueError(f"noise must be (B, C, ...) with B >= 1 and no empty dimension, got {tuple(noise.shape)}")
        if n is not None and n != noise.shape[0]:
            raise ValueError(f"n={n} disagrees with noise's batch size {noise.shape[0]}")
        if want is not None and tuple(noise.shape[1:]) != tuple(want):
            raise ValueError(f"noise must have shape (B, *{tuple(want)}), got {tuple(noise.shape)}")
        dtype = dtype or (torch.float64 if noise.dtype == torch.float64 else torch.float32)
        return noise.to(self.device, dtype)

    def key(self, noise: torch.Tensor, *, solver: str = DEFAULT_SOLVER, nfe: int | None = None,
            steps: int | None = None, grid="auto", afs: bool = DEFAULT_AFS, denoise: bool = False, dtype=None,
            net_dtype=None, schedule=None, **solver_kw) -> GraphKey:
        """The cache key of a call (validates every argument)."""
        x_T = self._state_noise(noise, None, None, 0, dtype)
        return self._prepare(x_T, solver, nfe, steps, grid, afs, denoise, net_dtype, schedule, solver_kw)[0]

    def _prepare(self, x_T, solver, nfe, steps, grid, afs, denoise, net_dtype, schedule, solver_kw, encode=False):
        """(GraphKey, Plan, nfe) of a call, memoised on its arguments. encode: the grid runs from
        t_end up to 1 (the reverse of the sampling grid the same arguments give; no AFS, no denoising)."""
        tf32 = _tf32_flags() if self.use_graphs else None
        for name, value in (("nfe", nfe), ("steps", steps)):  # before the memo: 10.0 or True never pass for 10, 1
            if value is not None:
                check_int(name, value, 1)
        afs, denoise = check_flag("afs", afs, allow_none=True), check_flag("denoise", denoise)
        try:
            memo_key = (solver, nfe, steps, grid if isinstance(grid, str) else _grid_key(grid), afs, denoise,
                        x_T.dtype, x_T.shape, net_dtype, schedule, tuple(sorted(solver_kw.items())), tf32, encode)
            hash(memo_key)
        except TypeError as e:
            raise TypeError(f"solver keyword arguments are part of the graph key and must be hashable ({e})") from None
        hit = self._memo.get(memo_key)
        if hit is not None:
            return hit
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")
        schedule = schedule if schedule is not None else self.schedule
        net_dtype = self._resolve_net_dtype(net_dtype, x_T.dtype)
        afs = AUTO_AFS.get(solver, DEFAULT_AFS) if afs is None else bool(afs)
        evals = evals_per_call(self.model)
        ts = _sampling_grid(solver, nfe, steps, grid, afs, bool(denoise), schedule, evals, encode)
        spent = nfe_of(solver, len(ts) - 1, afs, denoise, evals)
        if spent < 1:
            raise ValueError(f"a grid of {len(ts) - 1} step(s) with afs={afs}, denoise={denoise} "
                             "would call the network zero times")
        key = GraphKey(batch=int(x_T.shape[0]), image_shape=tuple(x_T.shape[1:]), dtype=x_T.dtype,
                       net_dtype=net_dtype, solver=solver, ts=tuple(ts.tolist()), schedule=schedule,
                       afs=afs, denoise=bool(denoise), backend=self.backend, device=str(self.device),
                       kw=tuple(sorted(solver_kw.items())),
                       tf32=tf32 if net_dtype == torch.float32 else None)
        plan = self._plans.get(key)
        if plan is None:
            with torch.inference_mode(False), torch.no_grad():
                plan = Plan(schedule, ts, key.batch, self.device, x_T.dtype, self.backend)
            self._plans[key] = plan
            if len(self._plans) > 4 * self.max_graphs + 16:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        if len(self._memo) > 256:
            self._memo.clear()
        self._memo[memo_key] = (key, plan, spent)
        return key, plan, spent

    def nfe_of(self, key: GraphKey) -> int:
        """Network evaluations per sample of a run (`solvers.nfe_of`)."""
        return nfe_of(key.solver, len(key.ts) - 1, key.afs, key.denoise, evals_per_call(self.model))

    def cache_info(self) -> dict:
        return {"graphs": len(self._graphs), "max_graphs": self.max_graphs, "plans": len(self._plans),
                "eager_keys": len(self._eager_keys), **self.stats}

    def clear(self):
        """Drop every captured graph (their static buffers go back to the shared pool)."""
        self._graphs.clear()
        self._eager_keys.clear()

    # ------------------------------------------------------------------ public entry
    @torch.no_grad()
    def sample(self, noise: torch.Tensor | None = None, *, n: int | None = None, shape=None, seed: int = 0,
               seeds=None, solver: str = DEFAULT_SOLVER, nfe: int | None = None, steps: int | None = None,
               grid="auto", afs: bool = DEFAULT_AFS, denoise: bool = False, dtype=None, net_dtype=None,
               schedule=None, check_finite: bool = True, **solver_kw):
        """Sample x0 from noise x_T with `solver`; returns (x0 (B, *shape) in `dtype` on the engine's
        device, NFE per sample). The arguments and defaults are those of `genie_fast.sample`."""
        with nvtx_range("sample"), torch.inference_mode(False), torch.no_grad():
            x_T = self._state_noise(noise, n, shape, seed, dtype, seeds)
            key, plan, spent = self._prepare(x_T, solver, nfe, steps, grid, afs, denoise, net_dtype, schedule,
                                             solver_kw)
            x0 = self._run(key, plan, x_T)
            if check_finite:
                self._check_finite(x0, key, plan, x_T, "samples", "noise x_T")
            return x0, spent

    @torch.no_grad()
    def encode(self, x0: torch.Tensor, *, solver: str = DEFAULT_SOLVER, nfe: int | None = None,
               steps: int | None = None, grid="auto", dtype=None, net_dtype=None, schedule=None,
               check_finite: bool = True, **solver_kw):
        """Encode data x0 (the network input at t_end) into latents x_T by solving the probability-flow
        ODE from t_end up to t = 1 on the reverse of the grid `sample` builds from the same solver,
        nfe / steps and grid (with AFS and the denoising step off: neither applies to encoding; an
        explicit grid may be given either way round). Returns (x_T in `dtype`, NFE per sample).
        ``sample(noise=x_T, afs=False)`` with the same solver, nfe / steps and grid decodes it."""
        with nvtx_range("encode"), torch.inference_mode(False), torch.no_grad():
            x = self._state_noise(x0, None, None, 0, dtype)
            key, plan, spent = self._prepare(x, solver, nfe, steps, grid, False, False, net_dtype, schedule,
                                             solver_kw, encode=True)
            if key.solver == "ipndm" and len(key.ts) - 1 < IPNDM_MIN_ENCODE_STEPS:
                warnings.warn(f"genie_fast encode: ipndm with {len(key.ts) - 1} steps; its fourth-order "
                              f"Adams-Bashforth weights on a grid whose steps grow amplify the error "
                              f"(reconstruction errors of 10^2 to 10^6 below {IPNDM_MIN_ENCODE_STEPS} steps on "
                              f"the bundled model): use {IPNDM_MIN_ENCODE_STEPS} steps or more, or another solver",
                              stacklevel=3)
            x_T = self._run(key, plan, x)
            if check_finite:
                self._check_finite(x_T, key, plan, x, "latents", "data x0")
            return x_T, spent

    def _check_finite(self, out: torch.Tensor, key: GraphKey, plan: Plan, start: torch.Tensor, what: str,
                      start_name: str):
        """One check after the loop (one host sync); on failure, find where by an eager re-run with checks."""
        if out.device.type == "meta" or bool(torch.isfinite(out).all()):  # meta tensors hold no values
            return
        bad = int((~torch.isfinite(out)).sum())
        if not bool(torch.isfinite(start).all()):
            where = f"the {start_name} holds {int((~torch.isfinite(start)).sum())} non-finite values"
        else:
            try:
                with find_nonfinite():
                    self._solve(self.network(key.net_dtype), key, plan, start)
                where = "an eager re-run with a check at every step stayed finite (the captured run differs)"
            except NonFiniteError as e:
                where = str(e)
        raise NonFiniteError(f"{bad} of {out.numel()} values of the {what} are NaN or inf: {where} "
                             f"(solver {key.solver}, {len(key.ts) - 1} steps, network {key.net_dtype}). "
                             f"check_finite=False returns such results unchecked")

    def _run(self, key: GraphKey, plan: Plan, x_T: torch.Tensor) -> torch.Tensor:
        self._sync_weights()
        net = self.network(key.net_dtype)
        if not self.use_graphs or key in self._eager_keys:
            return self._eager(net, key, plan, x_T)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._new_graph(net, key, plan, x_T)
            if entry is None:
                return self._eager(net, key, plan, x_T)
        else:
            self._graphs.move_to_end(key)
            entry.x_in.copy_(x_T)
        with nvtx_range("replay"):
            entry.graph.replay()
        self.stats["replays"] += 1
        return entry.out.clone()

    def _solve(self, net, key: GraphKey, plan: Plan, x_T: torch.Tensor) -> torch.Tensor:
        """The solver itself on the plan: the one loop, eager or under capture."""
        x0, _ = SOLVERS[key.solver](net, x_T, plan.ts, key.schedule, afs=key.afs, denoise=key.denoise,
                                    backend=key.backend, net_dtype=key.net_dtype, plan=plan, **dict(key.kw))
        return x0

    def _eager(self, net, key, plan, x_T) -> torch.Tensor:
        self.stats["eager_runs"] += 1
        head = getattr(net, "head", None)
        hooks = []
        if isinstance(head, nn.Module):  # a "head" range nested in "network" (GenieModel)
            def open_head(*args):  # hooks must return None (anything else replaces inputs/outputs)
                push("head")

            def close_head(*args):
                pop()
            hooks = [head.register_forward_pre_hook(open_head), head.register_forward_hook(close_head)]
        try:
            return self._solve(net, key, plan, x_T)
        finally:
            for h in hooks:
                h.remove()

    # ------------------------------------------------------------------ graphs
    def _capture(self, net, key: GraphKey, plan: Plan, x_T: torch.Tensor) -> _Entry:
        """Warm up on a side stream, then capture the solver call into the shared pool.

        The first warm-up run absorbs one-time work (handles, lazy init, autotuning, the plan's
        solver tables, which copy to the device); the last runs under
        `torch.cuda.set_sync_debug_mode("error")`, so a model that syncs host and device is found
        before any capture starts. Errors of the model itself propagate; what makes a model
        uncapturable raises `_Uncapturable`.
        """
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream(device=self.device)
        x_in = torch.empty_like(x_T, memory_format=torch.contiguous_format)
        x_in.copy_(x_T)
        s = self._stream
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s), nvtx_range("warmup"):
            for i in range(self.warmup):
                if i == self.warmup - 1 and self.warmup > 1:
                    with _sync_check():
                        self._solve(net, key, plan, x_in)
                else:
                    self._solve(net, key, plan, x_in)
        torch.cuda.current_stream(self.device).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        t0 = time.perf_counter()
        try:
            with nvtx_range("capture"), torch.cuda.graph(graph, pool=self._pool, stream=s):
                out = self._solve(net, key, plan, x_in)
        except Exception as err:
            raise _Uncapturable(f"capture failed: {type(err).__name__}: {err}") from err
        torch.cuda.synchronize(self.device)
        return _Entry(graph=graph, x_in=x_in, out=out, plan=plan, capture_s=time.perf_counter() - t0)

    def _warn_eager(self, net, err: BaseException):
        if not self._warned:
            self._warned = True
            warnings.warn(f"genie_fast engine: {type(net).__name__} could not be captured into a CUDA graph "
                          f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                          "this engine runs such runs eagerly", RuntimeWarning, stacklevel=5)

    def _new_graph(self, net, key: GraphKey, plan: Plan, x_T: torch.Tensor) -> _Entry | None:
        try:
            entry = self._capture(net, key, plan, x_T)
        except _Uncapturable as err:  # the model does something a graph cannot hold
            try:
                torch.cuda.synchronize(self.device)
            except Exception:  # pragma: no cover - the error stays with the device
                pass
            self._warn_eager(net, err)
            self._eager_keys.add(key)
            self.stats["capture_failures"] += 1
            return None
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
            self.stats["evictions"] += 1
        self._graphs[key] = entry
        self.stats["captures"] += 1
        self.stats["capture_ms_total"] += round(entry.capture_s * 1e3)
        return entry


def _sampling_grid(solver, nfe, steps, grid, afs, denoise, schedule, evals, encode=False) -> torch.Tensor:
    """The decreasing float64 grid of a sampling call: from steps=, the nfe= budget (default
    `DEFAULT_NFE`), or an explicit grid of times (which needs neither, and is checked against them).
    encode: the same grid increasing (an explicit grid is accepted either way round)."""
    if encode:
        if afs or denoise:
            raise ValueError("encoding runs from data to noise: AFS and the denoising step do not apply")
        if not isinstance(grid, str) and isinstance(grid, (Sequence, torch.Tensor)):
            ts = time_grid(schedule, None, grid)
            grid = ts.flip(0) if ts[-1] > ts[0] else ts
        return _sampling_grid(solver, nfe, steps, grid, False, False, schedule, evals).flip(0)
    if nfe is not None and steps is not None:
        raise ValueError(f"give nfe= or steps=, not both (got nfe={nfe}, steps={steps})")
    grid = grid_for(solver, grid)
    if isinstance(grid, str):
        if steps is None:
            budget = DEFAULT_NFE if nfe is None else check_int("nfe", nfe, 1)
            steps = steps_for_nfe(solver, int(budget), afs, denoise, evals)
            if steps < 1 or nfe_of(solver, steps, afs, denoise, evals) < 1:  # (one AFS step calls nothing)
                raise ValueError(f"nfe={budget} is too small for {solver} (afs={afs}, denoise={denoise}): the "
                                 f"smallest run that calls the network needs "
                                 f"{nfe_of(solver, steps + 1, afs, denoise, evals)}")
        else:
            check_int("steps", steps, 1)
        return time_grid(schedule, int(steps), grid)
    if not isinstance(grid, (Sequence, torch.Tensor)):
        raise TypeError(f"grid must be a name or a sequence of times, got {type(grid).__name__}")
    ts = time_grid(schedule, None, grid)
    if ts[-1] > ts[0]:
        raise ValueError("sampling runs from noise to data: the grid must decrease strictly (t = 1 -> t_end)")
    if steps is not None and steps != len(ts) - 1:
        raise ValueError(f"steps={steps} disagrees with the given grid of {len(ts) - 1} steps")
    need = nfe_of(solver, len(ts) - 1, afs, denoise, evals)
    if nfe is not None and need > nfe:
        raise ValueError(f"the given grid of {len(ts) - 1} steps needs {need} NFE with {solver}, over nfe={nfe}")
    return ts


def _grid_key(grid) -> tuple:
    if isinstance(grid, torch.Tensor):
        return tuple(grid.detach().cpu().flatten().tolist())
    if isinstance(grid, Sequence):
        return tuple(float(t) for t in grid)
    return (grid,)  # refused later with its own message


class _Uncapturable(RuntimeError):
    """The loop syncs host and device, or CUDA refused its capture: run it eagerly instead."""


class _sync_check:
    """Raise `_Uncapturable` if the code inside makes a synchronizing CUDA call."""

    def __enter__(self):
        self._old = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, exc_type, exc, tb):
        torch.cuda.set_sync_debug_mode(self._old)
        if exc is not None and "synchroniz" in str(exc):
            raise _Uncapturable(f"it syncs host and device ({str(exc).splitlines()[0]})") from exc
        return False


def _converted_copy(model: nn.Module, device, dtype) -> nn.Module:
    """deepcopy of `model` converted as ``model.to(device, dtype)`` converts it, through the modules'
    own ``_apply`` (a module that keeps a table in float64 through ``.half()``, e.g.
    `genie_fast.models.diffusers.DiffusersUNet`, keeps it here too), tensor by tensor (no
    full-precision intermediate copy on the device), without gradients, in the model's mode. The
    model itself is left untouched: the copy starts from aliases of its tensors, each replaced by
    its converted copy."""
    memo = {}
    with torch.inference_mode(False), torch.no_grad():
        for p in model.parameters():
            if id(p) not in memo:
                memo[id(p)] = nn.Parameter(p.detach(), requires_grad=False)  # an alias, converted below
        for b in model.buffers():
            if id(b) not in memo:
                memo[id(b)] = b.detach()
        net = copy.deepcopy(model, memo)
        net._apply(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, copy=True))
        return net


def _is_weakrefable(obj) -> bool:
    try:
        weakref.ref(obj)
        return True
    except TypeError:
        return False


def _has_float_weights(model) -> bool:
    return isinstance(model, nn.Module) and any(p.is_floating_point() for p in model.parameters())


def _image_shape(model) -> tuple:
    if getattr(model, "image_shape", None) is not None:
        return tuple(model.image_shape)
    cfg = getattr(model, "config", None) or getattr(getattr(model, "unet", None), "config", None)
    if cfg is None or not hasattr(cfg, "in_channels") or not hasattr(cfg, "image_size"):
        raise ValueError("the model has no .image_shape: pass noise=, or shape=(C, H, W)")
    return (cfg.in_channels, cfg.image_size, cfg.image_size)


# One engine per (model, device, backend), kept while the model lives: genie_fast.sample uses it.
_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def engine_for(model, device=None, backend: str = "auto") -> SamplingEngine:
    """The cached engine of `model` on `device` (created on first use, dropped with the model)."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    if not _is_weakrefable(model):  # cannot be cached without keeping it alive: a fresh engine
        return SamplingEngine(model, device=device, backend=backend)
    per_model = _ENGINES.setdefault(model, {})
    key = (str(device), backend)
    eng = per_model.get(key)
    if eng is None:
        eng = per_model[key] = SamplingEngine(model, device=device, backend=backend, _keep_alive=False)
    return eng
