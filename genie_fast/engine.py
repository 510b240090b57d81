"""The sampling engine: a half-precision network + head, a float32 ODE state, one CUDA graph per run.

    engine = SamplingEngine(model)                          # model: GenieModel or any eps model
    x0, nfe = engine.sample(noise, solver="genie", nfe=10)  # fp16 on CUDA, fp32 on the CPU

What runs where
  * Network and head run in ``dtype`` (fp16 by default on CUDA; bf16 and fp32 selectable) from the
    engine's own copy of the model's weights; the ODE state x_bar, the coefficients and the step
    arithmetic stay float32 (the fused step ops take a float32 state and a half-precision eps/head).
  * What must stay float32 for accuracy does so without extra kernels: the time embedding's
    sinusoid is computed in float32 by the network; GroupNorm's mean and variance are accumulated in
    float32 by ATen's CPU and CUDA kernels for fp16/bf16 inputs (their `opmath` type);
    scaled-dot-product attention (flash / memory-efficient) keeps the softmax max and sum in
    float32. `tests/test_engine.py` checks the GroupNorm claim on data whose statistics a half
    precision accumulation would ruin. The head's [h1|h2|h3] are combined in float32 inside the
    fused step.
  * On CUDA the whole NFE loop (every network and head call, every fused step, every coefficient
    lookup, the final denoising) is captured into ONE CUDA graph per `GraphKey` (batch, image
    shape, dtype, solver, grid, AFS, denoising, schedule, backend, device). Before capture the loop
    runs `warmup` times on a side stream (cuDNN/cuBLAS handles, Triton JIT and autotuning happen
    there; the last warm-up run is checked for host syncs).
    Static buffers: the noise input x_T (float32) and the graph's output x0 (float32), both owned by
    the cache entry; everything in between lives in one memory pool shared by all graphs of the
    engine, so a forward's activations are reused step after step and across graphs. Sharing is
    safe because replays are serialised on the caller's stream and each replay's output is cloned
    before the next: use one engine from one stream at a time.
  * Key rule: any change of the key is a cache miss, which captures a new graph (never a stale
    one); the cache keeps the `max_graphs` most recently used graphs and drops the oldest. Weights:
    the engine copies the model's weights once per dtype; before every call it compares the source
    tensors' version counters (in-place updates: optimizer steps, `load_state_dict`) and copies the
    changed ones in place (same addresses, so the captured graphs stay valid). After replacing
    parameter objects, call `refresh()`.
  * Noise is drawn outside the graph (float32, from a CPU generator seeded with `seed`: the same
    x_T as the CPU path for that seed) and copied into the static input; replay is deterministic.
  * No host-device sync inside the loop: coefficients live in a device table indexed at capture
    time, network times in a device tensor; nothing reads a device value on the host.
  * A model that cannot be captured (host syncs such as `.item()` or a pageable host-to-device
    copy, or anything CUDA refuses during capture) runs eagerly instead, with one warning per engine
    naming the reason. (Data-dependent Python control flow cannot be detected: a graph replays the
    path taken at capture.)
  * On the CPU the same API runs the same loop eagerly with the C++ step ops.

NVTX (see `genie_fast.profiling`): ``sample`` around each call; eager: ``step`` per step with
``network`` (``head`` nested) and ``update`` inside; graph: one ``replay`` range per launch.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import time
import warnings
import weakref

import torch
from torch import nn

from . import ops
from .profiling import nvtx_range, push, pop
from .schedule import COL, VPSchedule, coeff_table, time_grid
from .solvers import SOLVERS, nfe_of, steps_for_nfe

__all__ = ["SamplingEngine", "GraphKey", "ENGINE_SOLVERS", "DTYPES", "draw_noise", "engine_for",
           "sample_on_device", "no_tf32"]

ENGINE_SOLVERS = ("genie", "ddim", "dpmpp_2m")
DTYPES = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown network dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the engine runs the network in float16, bfloat16 or float32, got {dtype} "
                         "(use the reference solvers in genie_fast.solvers for float64)")
    return dtype


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


def draw_noise(n: int, shape, seed: int = 0, device=None) -> torch.Tensor:
    """x_T ~ N(0, I), float32 (n, *shape): `genie_fast.sampling.make_noise` (sample i from its own
    CPU generator seeded seed + i, so the same numbers on every device), moved to `device`."""
    from .sampling import make_noise

    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    return make_noise(int(n), tuple(shape), int(seed), dtype=torch.float32, device=device)


@dataclasses.dataclass(frozen=True)
class GraphKey:
    """Everything a captured graph depends on; any change captures a new graph."""

    batch: int
    image_shape: tuple
    dtype: torch.dtype
    solver: str
    ts: tuple            # the N + 1 grid times, float64 values
    schedule: object     # compared by identity; the key keeps it alive, so an id is never reused
    afs: bool
    denoise: bool
    backend: str
    device: str


@dataclasses.dataclass
class _Entry:
    """A cached graph and its static buffers (input noise, output sample), kept alive together."""

    graph: "torch.cuda.CUDAGraph"
    x_in: torch.Tensor
    out: torch.Tensor
    tables: tuple
    capture_s: float


class _Program:
    """The device-side constants of one run: coefficient rows and network times."""

    def __init__(self, key: GraphKey, device):
        ts = torch.tensor(key.ts, dtype=torch.float64)
        self.rows = coeff_table(key.schedule, ts).to(device)          # (N, K) float64 on the device
        # network times exactly as the reference solvers make them: float32 t, then model_time
        t_model = key.schedule.model_time(ts.to(torch.float32))
        self.t_net = t_model[:, None].expand(len(ts), key.batch).contiguous().to(device)  # (N+1, B)
        self.num_steps = len(ts) - 1


class SamplingEngine:
    """Graph-captured, half-precision GENIE/DDIM/DPM-Solver++ sampling for one model on one device.

    model: a `GenieModel` (``eps_and_head``) or any eps model ``model(x, t) -> eps`` (``ddim``,
    ``dpmpp_2m``); an ``nn.Module`` is copied to `device` in each dtype used, a plain callable is
    called as is. device: default CUDA when available. dtype: default fp16 on CUDA for a module
    with floating-point parameters, else fp32 (analytic models, plain functions, the CPU).
    use_graphs: default True on CUDA (False on the CPU, where graphs do not exist).
    max_graphs: how many captured graphs the LRU cache keeps. warmup: eager runs before capture.
    """

    def __init__(self, model, *, device=None, dtype=None, schedule=None, backend: str = "auto",
                 use_graphs: bool | None = None, max_graphs: int = 8, warmup: int = 2,
                 _keep_alive: bool = True):
        if model is None or not callable(model):
            raise TypeError(f"model must be a callable eps model, got {type(model).__name__}")
        self.device = torch.device(device if device is not None else
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' asked for, but torch sees no CUDA GPU")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if dtype is None:  # half precision is for networks on a GPU; analytic models stay float32
            dtype = torch.float16 if self.device.type == "cuda" and _has_float_weights(model) else torch.float32
        self.dtype = _as_dtype(dtype)
        if backend not in ops.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {ops.BACKENDS}")
        self.backend = backend
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
        self._nets: dict[torch.dtype, object] = {}      # dtype -> the engine's copy of the model
        self._sources = None                            # the model's parameters and buffers
        self._versions = None                           # their version counters at the last copy
        self._graphs: collections.OrderedDict[GraphKey, _Entry] = collections.OrderedDict()
        self._eager_keys: set[GraphKey] = set()
        self._pool = None
        self._stream = None
        self._warned = False
        self.stats = collections.Counter()              # captures, replays, eager_runs, evictions, ...

    # ------------------------------------------------------------------ weights
    @property
    def model(self):
        m = self._model_ref()
        if m is None:
            raise RuntimeError("the engine's model has been garbage-collected")
        return m

    def _source_tensors(self, model):
        if not isinstance(model, nn.Module):
            return []
        return [*model.parameters(), *model.buffers()]

    def _sync_weights(self):
        """Keep the per-dtype copies equal to the model's weights, cheaply, before every call.

        In-place changes (optimizer steps, `load_state_dict`, `copy_`) bump the source tensors'
        version counters: those tensors are copied into the engine's copies in place (same
        addresses, so captured graphs stay valid). The source tensor list is taken once (walking a
        large module costs milliseconds); after replacing parameter objects, call `refresh()`.
        """
        if self._sources is None:
            self._sources = self._source_tensors(self.model)
            self._versions = [t._version for t in self._sources]
            return
        versions = [t._version for t in self._sources]
        if versions != self._versions:
            with torch.no_grad():
                for net in self._nets.values():
                    for dst, s, v, v_old in zip(self._source_tensors(net), self._sources, versions, self._versions):
                        if v != v_old:
                            dst.copy_(s)
            self._versions = versions
            self.stats["weight_refreshes"] += 1

    def refresh(self):
        """Forget the weight copies and every graph (after replacing the model's parameter objects)."""
        self.clear()
        self._nets.clear()
        self._sources = self._versions = None

    def network(self, dtype=None):
        """The engine's copy of the model in `dtype` on the engine's device (eval mode, no grad)."""
        dtype = _as_dtype(dtype if dtype is not None else self.dtype)
        if not isinstance(self.model, nn.Module):
            return self.model  # a plain callable: its own dtype and device handling
        net = self._nets.get(dtype)
        if net is None:
            if self._sources is None:
                self._sync_weights()
            net = _converted_copy(self.model, self.device, dtype)
            if len(self._source_tensors(net)) != len(self._source_tensors(self.model)):
                raise RuntimeError("copying the model changed its set of parameters and buffers")
            self._nets[dtype] = net
        return net

    # ------------------------------------------------------------------ keys and cache
    def key(self, noise: torch.Tensor, *, solver: str = "genie", nfe: int | None = 10, grid="quadratic",
            afs: bool = False, denoise: bool = False, dtype=None, schedule=None) -> GraphKey:
        """The cache key of a run; validates every argument. Steps follow `solvers.steps_for_nfe`."""
        if solver not in ENGINE_SOLVERS:
            raise ValueError(f"the engine runs solvers {ENGINE_SOLVERS}, got {solver!r} "
                             "(the others run eagerly through genie_fast.solvers)")
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
            raise TypeError(f"noise must be a floating-point tensor, got {type(noise).__name__}"
                            + (f" of dtype {noise.dtype}" if isinstance(noise, torch.Tensor) else ""))
        if noise.dim() < 2 or noise.shape[0] < 1 or noise.numel() == 0:
            raise ValueError(f"noise must be (B, C, ...) with B >= 1 and no empty dimension, got {tuple(noise.shape)}")
        schedule = schedule if schedule is not None else self.schedule
        if isinstance(grid, str):
            if nfe is None or int(nfe) != nfe:
                raise ValueError(f"nfe must be an integer budget, got {nfe!r}")
            steps = steps_for_nfe(solver, int(nfe), afs, denoise)
            if steps < 1:
                raise ValueError(f"nfe={nfe} is too small for {solver} with afs={afs}, denoise={denoise}")
            ts = time_grid(schedule, steps, grid)
        else:
            ts = time_grid(schedule, None, grid)
            need = nfe_of(solver, len(ts) - 1, afs, denoise)
            if nfe is not None and need > nfe:
                raise ValueError(f"a grid of {len(ts) - 1} steps needs {need} NFE with {solver}, over nfe={nfe}")
        if nfe_of(solver, len(ts) - 1, afs, denoise) < 1:
            raise ValueError(f"a grid of {len(ts) - 1} step(s) with afs={afs}, denoise={denoise} "
                             "would call the network zero times")
        return GraphKey(batch=int(noise.shape[0]), image_shape=tuple(noise.shape[1:]),
                        dtype=_as_dtype(dtype if dtype is not None else self.dtype), solver=solver,
                        ts=tuple(float(t) for t in ts), schedule=schedule, afs=bool(afs),
                        denoise=bool(denoise), backend=self.backend, device=str(self.device))

    @staticmethod
    def nfe_of(key: GraphKey) -> int:
        """Network evaluations of a run (`solvers.nfe_of`): AFS saves one, denoising adds one."""
        return nfe_of(key.solver, len(key.ts) - 1, key.afs, key.denoise)

    def cache_info(self) -> dict:
        return {"graphs": len(self._graphs), "max_graphs": self.max_graphs,
                "eager_keys": len(self._eager_keys), **self.stats}

    def clear(self):
        """Drop every captured graph (their static buffers go back to the shared pool)."""
        self._graphs.clear()
        self._eager_keys.clear()

    # ------------------------------------------------------------------ the loop
    def _loop(self, net, x_T: torch.Tensor, key: GraphKey, prog: _Program, stages: bool) -> torch.Tensor:
        """The NFE loop on device tensors, float32 x_T -> float32 x0. Graph-safe: no host reads."""
        rows, t_net, backend, N = prog.rows, prog.t_net, key.backend, prog.num_steps
        rng = nvtx_range if stages else _no_range
        has_head = callable(getattr(net, "eps_and_head", None))
        x_bar = x_T * rows[0, COL["scale"]].to(torch.float32)   # x_bar_0 = x_T sqrt(1 + gamma_0^2)
        x = x_T.to(key.dtype)
        x0_prev = torch.zeros_like(x_bar)                      # DPM-Solver++: weight b = 0 on step 0
        for n in range(N):
            with rng("step"):
                if n == 0 and key.afs:
                    eps = x_T                                  # AFS: eps(x_T, 1) ~ x_T, d eps/d gamma = 0
                else:
                    with rng("network"):
                        if key.solver != "genie":
                            eps, head_out = net(x, t_net[n]), None
                        elif has_head:   # raw [h1|h2|h3], combined inside the fused step
                            eps, head_out = net.eps_and_head(x, t_net[n])
                        else:            # d eps / d gamma itself
                            eps, deps = net.eps_and_deps(x, t_net[n])
                with rng("update"):
                    if key.solver == "dpmpp_2m":
                        x_bar, x, x0_prev = ops.dpmpp_2m_step(x_bar, eps, x0_prev, rows[n], backend=backend)
                    elif key.solver == "ddim" or (n == 0 and key.afs):
                        x_bar, x = ops.ddim_step(x_bar, eps, rows[n], backend=backend)
                    elif has_head:
                        x_bar, x = ops.genie_step(x_bar, eps, head_out, rows[n], backend=backend)
                    else:
                        x_bar, x = ops.taylor_step(x_bar, eps, deps, rows[n], backend=backend)
                    if x.dtype != key.dtype:                   # the AFS step's x follows x_T's float32
                        x = x.to(key.dtype)
        if key.denoise:
            with rng("step"):
                with rng("network"):
                    eps = net(x, t_net[N])
                with rng("update"):
                    return ops.denoise_step(x_bar, eps, rows[N - 1], backend=backend)
        return x_bar * rows[N - 1, COL["inv_scale_next"]].to(torch.float32)

    def _check_model(self, net, key: GraphKey):
        if key.solver == "genie" and not (callable(getattr(net, "eps_and_head", None))
                                          or callable(getattr(net, "eps_and_deps", None))):
            raise TypeError(f"solver 'genie' needs a model with eps_and_head(x, t) or eps_and_deps(x, t) "
                            f"(a GenieModel); {type(net).__name__} has neither: use solver='ddim' or "
                            "'dpmpp_2m', or wrap the network and its head in genie_fast.models.GenieModel")

    def _eager(self, net, x_T, key, prog) -> torch.Tensor:
        head = getattr(net, "head", None)
        hooks = []
        if isinstance(head, nn.Module):  # a "head" range nested in "network" (GenieModel)
            def open_head(*args):  # hooks must return None (anything else replaces inputs/outputs)
                push("head")

            def close_head(*args):
                pop()
            hooks = [head.register_forward_pre_hook(open_head), head.register_forward_hook(close_head)]
        try:
            return self._loop(net, x_T, key, prog, stages=True)
        finally:
            for h in hooks:
                h.remove()

    def _capture(self, net, key: GraphKey, prog: _Program, x_T: torch.Tensor) -> _Entry:
        """Warm up on a side stream, then capture the loop into the shared pool.

        The first warm-up run absorbs one-time work (handles, lazy init, autotuning, which may
        sync); the last runs under `torch.cuda.set_sync_debug_mode("error")`, so a model that
        syncs host and device is found before any capture starts. Errors of the model itself
        propagate; what makes a model uncapturable raises `_Uncapturable`.
        """
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream(device=self.device)
        x_in = torch.empty_like(x_T, dtype=torch.float32, memory_format=torch.contiguous_format)
        x_in.copy_(x_T)
        s = self._stream
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s), nvtx_range("warmup"):
            for i in range(self.warmup):
                if i == self.warmup - 1 and self.warmup > 1:
                    with _sync_check():
                        self._loop(net, x_in, key, prog, stages=False)
                else:
                    self._loop(net, x_in, key, prog, stages=False)
        torch.cuda.current_stream(self.device).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        t0 = time.perf_counter()
        try:
            with nvtx_range("capture"), torch.cuda.graph(graph, pool=self._pool, stream=s):
                out = self._loop(net, x_in, key, prog, stages=False)
        except Exception as err:
            raise _Uncapturable(f"capture failed: {type(err).__name__}: {err}") from err
        torch.cuda.synchronize(self.device)
        return _Entry(graph=graph, x_in=x_in, out=out, tables=(prog.rows, prog.t_net),
                      capture_s=time.perf_counter() - t0)

    def _warn_eager(self, net, err: BaseException):
        if not self._warned:
            self._warned = True
            warnings.warn(f"genie_fast engine: {type(net).__name__} could not be captured into a CUDA graph "
                          f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                          "this engine runs such runs eagerly", RuntimeWarning, stacklevel=4)

    # ------------------------------------------------------------------ public entry
    @torch.no_grad()
    def sample(self, noise: torch.Tensor | None = None, *, n: int | None = None, shape=None, seed: int = 0,
               solver: str = "genie", nfe: int | None = 10, grid="quadratic", afs: bool = False,
               denoise: bool = False, dtype=None, schedule=None):
        """Sample x0 (float32, on the engine's device) from noise x_T; returns (x0, nfe).

        Arguments as in `genie_fast.sample`: noise x_T (B, C, ...) (moved to the device, read as
        float32), or n samples of `shape` (default: the model's image shape) drawn with
        `draw_noise(seed)`; solver "genie", "ddim" or "dpmpp_2m"; nfe with a grid name, or grid as
        the times themselves (nfe may then be None); afs, denoise as in `genie_fast.solvers`.
        dtype: the network's dtype for this call (default: the engine's).
        """
        with nvtx_range("sample"):
            if noise is None:
                if n is None:
                    raise ValueError("give noise, or n (and optionally shape and seed)")
                noise = draw_noise(n, shape or _image_shape(self.model), seed, self.device)
            key = self.key(noise, solver=solver, nfe=nfe, grid=grid, afs=afs, denoise=denoise, dtype=dtype,
                           schedule=schedule)
            self._sync_weights()
            net = self.network(key.dtype)
            self._check_model(net, key)
            x_T = noise.to(self.device, torch.float32)
            if not self.use_graphs or key in self._eager_keys:
                return self._run_eager(net, x_T, key), self.nfe_of(key)
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._new_graph(net, key, x_T)
                if entry is None:
                    return self._run_eager(net, x_T, key), self.nfe_of(key)
            else:
                self._graphs.move_to_end(key)
                entry.x_in.copy_(x_T)
            with nvtx_range("replay"):
                entry.graph.replay()
            self.stats["replays"] += 1
            return entry.out.clone(), self.nfe_of(key)

    def _run_eager(self, net, x_T, key):
        self.stats["eager_runs"] += 1
        return self._eager(net, x_T, key, _Program(key, self.device))

    def _new_graph(self, net, key: GraphKey, x_T: torch.Tensor) -> _Entry | None:
        prog = _Program(key, self.device)
        try:
            entry = self._capture(net, key, prog, x_T)
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
    """deepcopy of `model` whose floating parameters and buffers are converted tensor by tensor
    (no full-precision intermediate copy on the device), in eval mode, without gradients."""
    memo = {}
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in memo:
                memo[id(p)] = nn.Parameter(p.detach().to(device=device, dtype=dtype if p.is_floating_point()
                                                         else p.dtype, copy=True), requires_grad=False)
        for b in model.buffers():
            if id(b) not in memo:
                memo[id(b)] = b.detach().to(device=device, dtype=dtype if b.is_floating_point() else b.dtype,
                                            copy=True)
    return copy.deepcopy(model, memo).eval()


def _no_range(name):
    return _NULL


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NULL = _Null()


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
        raise ValueError("cannot tell the model's image shape: pass noise or image_shape=(C, H, W)")
    return (cfg.in_channels, cfg.image_size, cfg.image_size)


# One engine per (model, device), kept while the model lives: genie_fast.sample(device="cuda") uses it.
_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def engine_for(model, device=None, backend: str = "auto") -> SamplingEngine:
    """The cached engine of `model` on `device` (created on first use, dropped with the model)."""
    device = torch.device(device if device is not None else "cuda")
    if not _is_weakrefable(model):  # cannot be cached without keeping it alive: a fresh engine
        return SamplingEngine(model, device=device, backend=backend)
    per_model = _ENGINES.setdefault(model, {})
    key = (str(device), backend)
    eng = per_model.get(key)
    if eng is None:
        eng = per_model[key] = SamplingEngine(model, device=device, backend=backend, _keep_alive=False)
    return eng


def engine_solver_name(fn) -> str | None:
    """The engine's name for a solver function from `solvers.SOLVERS`, or None if it has no graph path."""
    for name in ENGINE_SOLVERS:
        if SOLVERS.get(name) is fn:
            return name
    return None


def sample_on_device(model, noise, ts, schedule, *, solver="genie", afs=False, denoise=False,
                     backend="auto", dtype=None):
    """The hook `genie_fast.sample` calls on a CUDA device: graph-captured, fp16 by default
    (or the noise's dtype when it is fp16/bf16). Returns (x0 float32, nfe)."""
    eng = engine_for(model, noise.device, backend)
    if dtype is None and noise.dtype in (torch.float16, torch.bfloat16):
        dtype = noise.dtype
    return eng.sample(noise, solver=solver, nfe=None, grid=ts, afs=afs, denoise=denoise, dtype=dtype,
                      schedule=schedule)
