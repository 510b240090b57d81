"""The sampling engine: every solver of `genie_fast.solvers`, one CUDA graph per key, a
half-precision network and head around a float32 ODE state.

    engine = SamplingEngine(model)                # model: a GenieModel or any eps model
    x0, nfe = engine.sample(noise)                # the defaults of genie_fast.sample
    x0, nfe = engine.sample(n=16, solver="heun", steps=5)

`genie_fast.sample()` runs through the engine on every device (`engine_for(model, device)`).

What runs where
  * The loop is the solver itself: the engine calls ``SOLVERS[solver]`` (all ten, and any solver
    added there later, with its keyword arguments in the key) with a `solvers.Plan` it built once
    per key. On CUDA it captures that whole call (every network and head call, genie_exact's JVP,
    every step, the final denoising) into ONE CUDA graph per key; elsewhere it runs the same call
    eagerly (the C++ step ops on the CPU).
  * Precision: the ODE state and the samples are in ``dtype`` (float32 by default; float64 for
    accuracy work). The network runs in ``net_dtype``: fp16 by default on CUDA for a module with
    floating-point weights (bf16, fp32, fp64 selectable), else the state's dtype. On the CPU fp16 is
    refused (ATen's CPU half convolutions are slow) and bf16 runs where the CPU has it natively,
    else float32 with a one-line notice (`devices.cpu_net_dtype`). What must stay float32 for
    accuracy does so without extra kernels: the U-Net's time
    embedding sinusoid is computed in float32; GroupNorm's mean and variance are accumulated in
    float32 by ATen's kernels for fp16/bf16 inputs (`tests/test_engine.py` checks it on data a
    half-precision accumulation would ruin); the fused attention kernels keep the softmax max and
    sum in float32 (the U-Net passes 4-D (B, heads, L, D) inputs, which they need); the head's
    [h1|h2|h3] are combined in float32 inside the fused step.
  * The model on the device (``device`` means the same for every solver and every model; where it
    is not given, `devices.default_device`): an ``nn.Module`` already on the device in ``net_dtype``
    is used as is and read live; any other module is copied there once per ``net_dtype`` and its
    changed tensors are copied in place before every call (graphs stay valid; after replacing
    parameter objects call `refresh()`); a plain callable is called as is, with tensors on the
    device. The details are in `genie_fast.weights`.
  * A model may declare ``evals_per_call`` (network evaluations per call and sample, default 1,
    e.g. 2 for a guidance wrapper on a doubled batch): NFE budgets and the returned NFE count it.
  * Key rule (`GraphKey`): batch, image shape, state and network dtypes, solver and its keyword
    arguments, the grid's times, schedule, AFS, denoising, backend, device, and for float32
    networks captured in a graph the TF32 flags (a graph captured with TF32 replays TF32 kernels).
    Any change is a cache miss that captures a new graph (never a stale one); the cache keeps the
    ``max_graphs`` most recently used graphs. The arguments of a call are memoised to their
    (key, plan, NFE), so a repeated call builds no grid and reads no time on the host.
  * Graphs (`genie_fast.graphs`): warm-up runs on a side stream, then one capture; static input
    and output per cache entry; everything in between lives in one memory pool shared by all graphs
    of the engine (replays are serialised on the caller's stream and each output is cloned before
    the next: use one engine from one stream at a time). A model that cannot be captured (host
    syncs such as ``.item()``, or anything CUDA refuses during capture) runs eagerly instead, with
    one warning per engine. (Data-dependent Python control flow cannot be detected: a graph
    replays the path taken at capture.)
  * Noise is drawn outside the graph (`genie_fast.noise`: on the CPU in float32, the same x_T on
    every device) and copied into the static input. Options are resolved by `solvers.resolve`.
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
import dataclasses
import threading
import warnings
import weakref
from collections.abc import Sequence

import torch
from torch import nn

from . import ops
from .checks import check_device, check_flag, check_int
from .devices import DTYPES, as_dtype, cpu_net_dtype, default_device, no_tf32, tf32_flags
from .graphs import GraphEntry, Uncapturable, capture
from .grid_store import grid_context, stored_times
from .guidance import wrapper_for
from .noise import initial_state, make_noise, seed_noise
from .profiling import nvtx_range, pop, push
from .schedule import VPSchedule, check_schedule, time_grid
from .solvers import DEFAULT_SOLVER, SOLVERS, NonFiniteError, Plan, evals_per_call, find_nonfinite, nfe_of, resolve
from .solvers.accounting import _check_solver
from .solvers.options import check_grid_arg, check_solver_kw
from .weights import ModelWeights, converted_copy as _converted_copy  # noqa: F401  (engine._converted_copy: tests, bench)

__all__ = ["SamplingEngine", "GraphKey", "DTYPES", "make_noise", "seed_noise", "NonFiniteError", "engine_for",
           "no_tf32"]

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


class SamplingEngine:
    """Sampling with every solver for one model on one device: CUDA graphs, half-precision network.

    model: a `GenieModel` (``eps_and_head``) or any eps model ``model(x, t) -> eps``; see the module
    docstring for how it gets to the device. device: default `devices.default_device()` (CUDA when
    available, else the CPU).
    net_dtype: the network's default dtype for this engine (None: fp16 on CUDA for a module with
    floating-point weights, else the state's dtype). schedule: default the model's ``.schedule``,
    else `VPSchedule()`. backend: of the fused step ops (`genie_fast.ops`). use_graphs: default True
    on CUDA. max_graphs: how many captured graphs the LRU cache keeps. warmup: eager runs before a
    capture. channels_last (CPU): None: the engine's own float32 / bf16 copies are channels-last;
    True: always a channels-last copy; False: never. compile (CPU): the network compiled by
    torch.compile (inductor) on its first call per shape, for long runs (`weights.CompiledNet`;
    ``cache_info()["compile_s"]``).
    """

    def __init__(self, model, *, device=None, net_dtype=None, schedule=None, backend: str = "auto",
                 use_graphs: bool | None = None, max_graphs: int = 8, warmup: int = 2,
                 channels_last: bool | None = None, compile: bool = False, _keep_alive: bool = True):
        if model is None or not callable(model):
            raise TypeError(f"model must be a callable eps model, got {type(model).__name__}")
        self.device = check_device(device if device is not None else default_device())
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.net_dtype = None if net_dtype is None else self._check_net_dtype(net_dtype)
        self.backend = ops.check_backend(backend, self.device)  # a named backend that cannot run here raises
        use_graphs = check_flag("use_graphs", use_graphs, allow_none=True)
        if use_graphs is None:
            use_graphs = self.device.type == "cuda"
        if use_graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the engine runs on {self.device}")
        self.use_graphs = bool(use_graphs)
        self.max_graphs = check_int("max_graphs", max_graphs, 1)
        self.warmup = check_int("warmup (capture needs a warm-up run)", warmup, 1)
        if schedule is not None:
            check_schedule(schedule)
        self.schedule = schedule if schedule is not None else getattr(model, "schedule", None) or VPSchedule()

        self._model_ref = weakref.ref(model) if _is_weakrefable(model) else (lambda m=model: m)
        self._model_strong = model if _keep_alive else None
        channels_last = check_flag("channels_last", channels_last, allow_none=True)
        if check_flag("compile", compile) and self.device.type != "cpu":
            raise ValueError(f"compile is for the CPU path; on {self.device} the engine replays CUDA graphs")
        self._weights = ModelWeights(self.device, channels_last, compile)  # the module as run, per net_dtype
        self._memo: dict = {}                           # call arguments -> (GraphKey, Plan, nfe)
        self._plans: collections.OrderedDict[GraphKey, Plan] = collections.OrderedDict()
        self._graphs: collections.OrderedDict[GraphKey, GraphEntry] = collections.OrderedDict()
        self._eager_keys: set[GraphKey] = set()
        self._lock = threading.RLock()                  # caches, weights, captures and replays (threads)
        self._done = None                               # CUDA event: the last replay's output is cloned
        self._pool = None
        self._stream = None
        self._warned = False
        self.stats = collections.Counter()              # captures, replays, eager_runs, evictions, ...
        self._cond_engines = weakref.WeakKeyDictionary()  # Conditioned wrapper -> its engine (`_conditioned`)

    # ------------------------------------------------------------------ dtypes
    def _check_net_dtype(self, net_dtype) -> torch.dtype:
        dtype = as_dtype(net_dtype, (torch.float16, torch.bfloat16, torch.float32, torch.float64), "net_dtype")
        return cpu_net_dtype(dtype) if self.device.type == "cpu" else dtype

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
        return self._weights.get(model, self._resolve_net_dtype(net_dtype, torch.float32))

    def _sync_weights(self):
        """Keep the engine's view of the weights current, before every call (`ModelWeights.sync`)."""
        changed = self._weights.sync()
        if changed == "replaced":
            self.refresh()
            self.stats["refreshes"] += 1
        elif changed == "copied":
            self.stats["weight_refreshes"] += 1

    def refresh(self):
        """Forget the weight copies and every graph (after replacing the model's parameter objects)."""
        with self._lock:
            self.clear()
            self._weights.clear()

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

    def _state_noise(self, noise, n, shape, seed, dtype, seeds=None, name="noise") -> torch.Tensor:
        """x_T on the device in the state dtype (`noise.initial_state`); a UserWarning when its image
        shape is not the model's ``image_shape`` (a convolutional network runs at any size, but it
        learned one)."""
        x = initial_state(noise, n, self._shape(shape), seed, dtype, seeds, self.device,
                          lambda: _image_shape(self.model), name)
        own = getattr(self.model, "image_shape", None)
        if own is not None and tuple(x.shape[1:]) != tuple(own):
            warnings.warn(f"genie_fast sample: the sample shape {tuple(x.shape[1:])} differs from the model's "
                          f"image_shape {tuple(own)}; the network was trained at {tuple(own)} and runs at other "
                          "sizes without knowing them", UserWarning, stacklevel=_caller_level())
        return x

    def key(self, noise: torch.Tensor, *, solver: str = DEFAULT_SOLVER, nfe: int | None = None,
            steps: int | None = None, grid="auto", afs: bool | None = None, denoise: bool = False, dtype=None,
            net_dtype=None, schedule=None, **solver_kw) -> GraphKey:
        """The cache key of a call (validates every argument)."""
        x_T = self._state_noise(noise, None, None, 0, dtype)
        return self._prepare(x_T, solver, nfe, steps, grid, afs, denoise, net_dtype, schedule, solver_kw)[0]

    def _prepare(self, *args, **kw):
        with self._lock:
            return self._prepare_locked(*args, **kw)

    def _prepare_locked(self, x_T, solver, nfe, steps, grid, afs, denoise, net_dtype, schedule, solver_kw,
                        encode=False):
        """(GraphKey, Plan, nfe) of a call, memoised on its arguments. encode: the grid runs from
        t_end up to 1 (the reverse of the sampling grid the same arguments give; no AFS, no denoising)."""
        tf32 = tf32_flags() if self.use_graphs else None
        for name, value in (("nfe", nfe), ("steps", steps)):  # before the memo: 10.0 or True never pass for 10, 1
            if value is not None:
                check_int(name, value, 1)
        afs, denoise = check_flag("afs", afs, allow_none=True), check_flag("denoise", denoise)
        _check_solver(solver)
        grid = check_grid_arg(grid)
        if schedule is not None and not isinstance(schedule, VPSchedule):  # (the default's type: no check needed)
            check_schedule(schedule)
        # grid="auto" / "tuned": the model's stored tuned grids (`grid_store`) decide, for its guidance scale
        stored = grid_context(self.model) if isinstance(grid, str) and grid in ("auto", "tuned") else None
        try:
            memo_key = (solver, nfe, steps, grid if isinstance(grid, str) else _grid_key(grid),
                        getattr(grid, "afs", None), afs, denoise,  # (a tuned grid may carry its AFS: `resolve`)
                        x_T.dtype, x_T.shape, net_dtype, schedule, tuple(sorted(solver_kw.items())), tf32, encode,
                        None if stored is None else (id(stored[0]), stored[1]))
            hash(memo_key)
        except TypeError:
            check_solver_kw(solver, solver_kw)  # names the keyword argument
            raise
        hit = self._memo.get(memo_key)
        if hit is not None:
            return hit
        check_solver_kw(solver, solver_kw)
        schedule = schedule if schedule is not None else self.schedule
        net_dtype = self._resolve_net_dtype(net_dtype, x_T.dtype)
        opts = resolve(solver, nfe, steps, "auto" if grid == "tuned" else grid, afs, denoise,
                       evals_per_call=evals_per_call(self.model), encode=encode)
        if isinstance(grid, str) and grid in ("auto", "tuned"):
            times = stored_times(stored, solver, opts.steps, opts.afs, opts.denoise, required=grid == "tuned",
                                 nfe=opts.spent)
            opts = opts if times is None else opts._replace(grid=times)
        afs, denoise, spent = opts.afs, opts.denoise, opts.spent
        ts = time_grid(schedule, opts.steps, opts.grid) if isinstance(opts.grid, str) else opts.grid
        if encode and ts[-1] < ts[0]:  # encoding runs the sampling grid reversed (a given one either way)
            ts = ts.flip(0)
        key = GraphKey(batch=int(x_T.shape[0]), image_shape=tuple(x_T.shape[1:]), dtype=x_T.dtype,
                       net_dtype=net_dtype, solver=solver, ts=tuple(ts.tolist()), schedule=schedule,
                       afs=afs, denoise=denoise, backend=self.backend, device=str(self.device),
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
        compile_s, compiles = self._weights.compile_seconds()
        return {"graphs": len(self._graphs), "max_graphs": self.max_graphs, "plans": len(self._plans),
                "eager_keys": len(self._eager_keys), **self.stats,
                **({"compile_s": compile_s, "compiles": compiles} if self._weights.compile else {})}

    def clear(self):
        """Drop every captured graph (their static buffers go back to the shared pool)."""
        with self._lock:
            self._graphs.clear()
            self._eager_keys.clear()

    # ------------------------------------------------------------------ public entry
    @torch.no_grad()
    def sample(self, noise: torch.Tensor | None = None, *, n: int | None = None, shape=None, seed: int = 0,
               seeds=None, solver: str = DEFAULT_SOLVER, nfe: int | None = None, steps: int | None = None,
               grid="auto", afs: bool | None = None, denoise: bool = False, dtype=None, net_dtype=None,
               schedule=None, check_finite: bool = True, cond=None, negative_cond=None, guidance_scale=None,
               **solver_kw):
        """Sample x0 from noise x_T with `solver`; returns (x0 (B, *shape) in `dtype` on the engine's
        device, NFE per sample). The arguments and defaults are those of `genie_fast.sample`; with
        cond / negative_cond / guidance_scale the run goes to the engine of the model's conditioned
        wrapper (`_conditioned`), whose graphs read the inputs as device buffers."""
        if cond is not None or negative_cond is not None or guidance_scale is not None:
            batch = noise.shape[0] if isinstance(noise, torch.Tensor) else \
                len(seeds) if seeds is not None and hasattr(seeds, "__len__") else n
            eng, _wrapper = self._conditioned(batch, cond, negative_cond, guidance_scale)  # (held for the call)
            return eng.sample(
                noise, n=n, shape=shape, seed=seed, seeds=seeds, solver=solver, nfe=nfe, steps=steps, grid=grid,
                afs=afs, denoise=denoise, dtype=dtype, net_dtype=net_dtype, schedule=schedule,
                check_finite=check_finite, **solver_kw)
        check_finite = check_flag("check_finite", check_finite)
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
               check_finite: bool = True, cond=None, negative_cond=None, guidance_scale=None, **solver_kw):
        """Encode data x0 (the network input at t_end) into latents x_T by solving the probability-flow
        ODE from t_end up to t = 1 on the reverse of the grid `sample` builds from the same solver,
        nfe / steps and grid (with AFS and the denoising step off: neither applies to encoding; an
        explicit grid may be given either way round). Returns (x_T in `dtype`, NFE per sample).
        ``sample(noise=x_T, afs=False)`` with the same solver, nfe / steps and grid decodes it.
        cond / negative_cond / guidance_scale: as in `sample`."""
        if cond is not None or negative_cond is not None or guidance_scale is not None:
            batch = x0.shape[0] if isinstance(x0, torch.Tensor) and x0.dim() else None
            eng, _wrapper = self._conditioned(batch, cond, negative_cond, guidance_scale)
            return eng.encode(
                x0, solver=solver, nfe=nfe, steps=steps, grid=grid, dtype=dtype, net_dtype=net_dtype,
                schedule=schedule, check_finite=check_finite, **solver_kw)
        check_finite = check_flag("check_finite", check_finite)
        with nvtx_range("encode"), torch.inference_mode(False), torch.no_grad():
            x = self._state_noise(x0, None, None, 0, dtype, name="x0")
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

    def _conditioned(self, batch, cond, negative_cond, guidance_scale) -> tuple:
        """(engine, wrapper): the engine, with this engine's settings, of the model's Conditioned
        wrapper for this thread and input signature (`guidance.wrapper_for`: the inputs are copied
        into its buffers, which its graphs read; same shapes, same wrapper, same graphs). The engine
        holds its wrapper weakly: the caller holds it for the call."""
        wrapper = wrapper_for(self.model, batch, None, guidance_scale, cond, negative_cond)
        if wrapper is self.model:  # e.g. guidance_scale=1 alone
            return self, wrapper
        with self._lock:
            eng = self._cond_engines.get(wrapper)
            if eng is None:
                eng = self._cond_engines[wrapper] = SamplingEngine(
                    wrapper, device=self.device, net_dtype=self.net_dtype, schedule=self.schedule,
                    backend=self.backend, use_graphs=self.use_graphs, max_graphs=self.max_graphs, warmup=self.warmup,
                    channels_last=self._weights.channels_last, compile=self._weights.compile, _keep_alive=False)
            return eng, wrapper

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
        """One run. Threads (docs/guide.md, "Threads"): the caches and the weights are read and updated
        under the engine's lock; eager runs then proceed in parallel (each allocates its own tensors);
        a capture or a replay holds the lock until its output is cloned, and on a GPU each replay's
        stream first waits for the previous replay of this engine (its graphs share static buffers and
        one memory pool), whichever thread and stream launched it."""
        with self._lock:
            self._sync_weights()
            net = self.network(key.net_dtype)
            if self.use_graphs and key not in self._eager_keys:
                out = self._replay(net, key, plan, x_T)
                if out is not None:
                    return out
        return self._eager(net, key, plan, x_T)

    def _replay(self, net, key: GraphKey, plan: Plan, x_T: torch.Tensor) -> torch.Tensor | None:
        """The run as a replay of its graph (captured first if new; lock held); None: not capturable."""
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        if stream is not None and self._done is not None:
            stream.wait_event(self._done)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._new_graph(net, key, plan, x_T)
            if entry is None:
                return None
        else:
            self._graphs.move_to_end(key)
            entry.x_in.copy_(x_T)
        with nvtx_range("replay"):
            entry.graph.replay()
        self.stats["replays"] += 1
        out = entry.out.clone()
        if stream is not None:
            self._done = torch.cuda.Event()
            self._done.record(stream)
        return out

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
    def _warn_eager(self, net, err: BaseException):
        if not self._warned:
            self._warned = True
            warnings.warn(f"genie_fast engine: {type(net).__name__} could not be captured into a CUDA graph "
                          f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                          "this engine runs such runs eagerly", RuntimeWarning, stacklevel=5)

    def _new_graph(self, net, key: GraphKey, plan: Plan, x_T: torch.Tensor) -> GraphEntry | None:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream(device=self.device)
        try:
            entry = capture(lambda x: self._solve(net, key, plan, x), x_T, plan, pool=self._pool,
                            stream=self._stream, warmup=self.warmup, device=self.device)
        except Uncapturable as err:  # the model does something a graph cannot hold
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


def _caller_level() -> int:
    """The stacklevel of a warning issued by the caller of this function that points at the first
    frame outside genie_fast and torch (the user's call), whichever entry point led there."""
    import os
    import sys

    inside = (os.path.dirname(os.path.abspath(__file__)) + os.sep,  # genie_fast, and torch's decorators around it
              os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def _grid_key(grid) -> tuple:
    if isinstance(grid, torch.Tensor):
        return tuple(grid.detach().cpu().flatten().tolist())
    if isinstance(grid, Sequence):
        return tuple(float(t) for t in grid)
    return (grid,)  # refused later with its own message


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
_ENGINES_LOCK = threading.Lock()


def engine_for(model, device=None, backend: str = "auto", compile: bool = False) -> SamplingEngine:
    """The cached engine of `model` on `device` (created on first use, dropped with the model);
    compile: one whose network is compiled (`SamplingEngine`'s compile, the CPU only)."""
    device = check_device(device if device is not None else default_device())
    ops.check_backend(backend, device)  # before the backend is part of a dict key
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    if not _is_weakrefable(model):  # cannot be cached without keeping it alive: a fresh engine
        return SamplingEngine(model, device=device, backend=backend, compile=compile)
    with _ENGINES_LOCK:  # threads sharing a model share its engine
        per_model = _ENGINES.setdefault(model, {})
        key = (str(device), backend) + (("compile",) if compile else ())
        eng = per_model.get(key)
        if eng is None:
            eng = per_model[key] = SamplingEngine(model, device=device, backend=backend, compile=compile,
                                                  _keep_alive=False)
        return eng
