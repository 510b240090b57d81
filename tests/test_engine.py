"""The sampling engine (genie_fast/engine.py): every solver of SOLVERS through its eager path and its
capture path (torch.cuda's graph API replaced on the CPU by a stand-in that records every aten op
of the capture and replays them on the captured tensors), against the reference solvers and an
independent float64 loop; keys, memo, cache, weights, dtypes, devices, NVTX; CUDA-marked parts
(skipped without a GPU) capture and replay on a real GPU."""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from _helpers import randomize

import genie_fast
from genie_fast import engine as engine_mod
from genie_fast import solvers as solvers_mod
from genie_fast.engine import GraphKey, SamplingEngine, make_noise
from genie_fast.guidance import Conditioned
from genie_fast.models.head import GenieModel
from genie_fast.models.unet import UNet
from genie_fast.ops import head_combine_ref
# the half-precision and graph-vs-eager bounds: one table, where and how they were measured is written there
from genie_fast.precision import (GRAPH_VS_EAGER_FP32_BOUND, HALF_PRECISION_BOUNDS, graph_vs_eager_half_bound,
                                  half_bounds)
from genie_fast.schedule import DiscreteVPSchedule, VPSchedule, time_grid
from genie_fast.solvers import AUTO_GRID, DEFAULT_AFS, DEFAULT_SOLVER, JVP_NFE, SOLVERS, nfe_of, steps_for_nfe

ALL = list(SOLVERS)
ORACLE_SOLVERS = ("genie", "ddim", "dpmpp_2m")  # the ones the independent float64 loop writes out
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def random_model(config="tiny", seed=0, schedule=None):
    """A GenieModel whose zero-initialised output layers get PyTorch's default init (so eps and the
    head are far from zero and every layer matters)."""
    torch.manual_seed(seed)
    m = GenieModel(UNet(config), schedule=schedule)
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            mod.reset_parameters()
    if m.unet.label_emb is not None:
        nn.init.normal_(m.unet.label_emb.weight)
    return m.eval()


def noise_for(model, batch=3, seed=1):
    c = model.unet.config
    return make_noise(batch, (c.in_channels, c.image_size, c.image_size), seed)


def rel_err(x, ref):
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def reference(model, x_T, solver, *, nfe=None, steps=None, grid="auto", afs=None, denoise=False, **kw):
    """The reference solver called directly on the grid and options the engine should pick."""
    afs = True if afs is None else afs
    grid = AUTO_GRID[solver] if grid == "auto" else grid
    schedule = getattr(model, "schedule", None) or VPSchedule()
    if isinstance(grid, str):
        steps = steps or steps_for_nfe(solver, nfe or 10, afs, denoise)
        ts = time_grid(schedule, steps, grid)
    else:
        ts = grid
    with torch.no_grad():
        return SOLVERS[solver](model, x_T, ts, schedule, afs=afs, denoise=denoise, **kw)


# --------------------------------------------------------------------------- a stand-in for CUDA graphs

class RecordingGraph:
    """CPU stand-in of torch.cuda.CUDAGraph. During capture every aten op is recorded with its
    arguments (tensors by identity) and outputs; replay runs the non-view ops again in order and
    writes their results into the tensors the capture produced, as a CUDA graph re-launches its
    kernels on fixed memory. So whatever the loop baked in at capture (a Python float read from a
    tensor, a tensor made from host data) stays baked in, and a host read refuses, as on a GPU."""

    SYNCS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal", "aten::item")

    def __init__(self):
        self.ops, self.replays = [], 0

    def replay(self):
        self.replays += 1
        for func, args, kwargs, out in self.ops:
            if func.is_view:  # a view aliases memory the replay updates in place
                continue
            fresh = func(*args, **kwargs)
            for o, r in zip(_tensors(out), _tensors(fresh)):
                if o.data_ptr() != r.data_ptr():
                    o.copy_(r)


def _tensors(out):
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


class _Recorder(TorchDispatchMode):
    def __init__(self, graph):
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name in RecordingGraph.SYNCS:
            raise RuntimeError(f"operation not permitted when stream is capturing ({func._schema.name})")
        out = func(*args, **kwargs)
        self.graph.ops.append((func, args, kwargs, out))
        return out


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's graph API replaced by RecordingGraph and no-op streams; returns a call log."""
    log = {"captures": [], "sync_modes": [], "streams": 0}

    class Stream:
        def __init__(self, device=None):
            log["streams"] += 1

        def wait_stream(self, other):
            pass

    @contextlib.contextmanager
    def graph(g, pool=None, stream=None, **kw):
        log["captures"].append((g, pool, stream))
        with _Recorder(g):
            yield

    @contextlib.contextmanager
    def stream_ctx(s):
        yield

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: ("pool", 1))
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", stream_ctx)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", RecordingGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: log["sync_modes"].append(mode))
    return log


def graph_engine(model, **kw):
    """A CPU engine that takes its CUDA-graph path (with the `fake_cuda` stand-ins)."""
    eng = SamplingEngine(model, device="cpu", **kw)
    eng.use_graphs = True
    return eng


def _kw(solver):
    return {"order": 3} if solver == "unipc" else {}


# --------------------------------------------------------------------------- every solver, both paths

@pytest.mark.parametrize("solver", ALL)
def test_eager_path_equals_reference_solver(solver):
    """The engine runs the solver itself: on the CPU, with the model used as is, bitwise equal."""
    model = random_model()
    x_T = noise_for(model)
    for afs, denoise in ((False, False), (True, True)):
        x0, nfe = SamplingEngine(model, device="cpu").sample(x_T, solver=solver, nfe=12, afs=afs, denoise=denoise,
                                                              **_kw(solver))
        ref, nfe_ref = reference(model, x_T, solver, nfe=12, afs=afs, denoise=denoise, **_kw(solver))
        assert nfe == nfe_ref and torch.equal(x0, ref), (afs, denoise, rel_err(x0, ref))


@pytest.mark.parametrize("solver", ALL)
def test_capture_path_equals_reference_solver(fake_cuda, solver):
    """Capture (2 sync-checked warm-ups on a side stream, then the solver call under the recording
    graph), a replay, and a replay with new noise: each equals the reference solver for its noise."""
    model = random_model()
    eng = graph_engine(model)
    z1, z2 = noise_for(model, seed=1), noise_for(model, seed=2)
    for z in (z1, z2, z1):
        x0, nfe = eng.sample(z, solver=solver, steps=4, afs=True, denoise=True, **_kw(solver))
        ref, nfe_ref = reference(model, z, solver, steps=4, afs=True, denoise=True, **_kw(solver))
        assert nfe == nfe_ref
        if solver == "genie_exact":  # forward AD decomposes its formulas otherwise under the recorder
            assert rel_err(x0, ref) < 1e-6  # (a Python dispatch mode): round-off, not a stale value
        else:
            assert torch.equal(x0, ref), rel_err(x0, ref)
    assert eng.stats["captures"] == 1 and eng.stats["replays"] == 3 and eng.stats["eager_runs"] == 0
    assert fake_cuda["sync_modes"] == ["error", 0] and len(fake_cuda["captures"]) == 1
    graph = fake_cuda["captures"][0][0]
    assert graph.replays == 3 and len(graph.ops) > 50


def test_recording_graph_replays_what_was_captured_not_python(fake_cuda):
    """The stand-in is not a re-run of Python: a value read on the host during capture stays baked
    in (as on a GPU), so a loop that did so would fail the tests above. Here shown directly."""
    g = RecordingGraph()
    x = torch.ones(3)
    with torch.cuda.graph(g):
        y = x * 2 + 1
        z = y * torch.full((3,), float(3))  # a tensor made from host data at capture: a constant
        w = z[1:] + 0                       # a view of a captured tensor, then an op on it
    x.fill_(2.0)
    g.replay()
    assert torch.equal(y, torch.full((3,), 5.0)) and torch.equal(z, torch.full((3,), 15.0))
    assert torch.equal(w, torch.full((2,), 15.0))
    with pytest.raises(RuntimeError, match="not permitted when stream is capturing"):
        with torch.cuda.graph(RecordingGraph()):
            float(x.sum())


@pytest.mark.parametrize("solver", ORACLE_SOLVERS)
def test_eager_fp32_matches_float64_loop(solver):
    """FlashAttention's rule: the engine's fp32 error against the independent float64 loop is at most
    twice the error of that same loop run in float32, plus a small atol."""
    model = random_model()
    x_T = noise_for(model)
    for afs, denoise in ((False, False), (True, True)):
        x0, nfe = SamplingEngine(model, device="cpu").sample(x_T, solver=solver, nfe=6, grid="quadratic", afs=afs,
                                                              denoise=denoise)
        ts = time_grid(model.schedule, steps_for_nfe(solver, 6, afs, denoise))
        with torch.no_grad():
            ref64 = genie_loop(model.double(), x_T, ts, model.schedule, solver=solver, afs=afs, denoise=denoise,
                               dtype=torch.float64)
            ref32 = genie_loop(model.float(), x_T, ts, model.schedule, solver=solver, afs=afs, denoise=denoise,
                               dtype=torch.float32)
        assert nfe == 6 and x0.dtype == torch.float32 and x0.device.type == "cpu"
        err = (x0.double() - ref64).abs().max()
        err32 = (ref32.double() - ref64).abs().max()
        assert err <= 2 * err32 + 1e-6 * ref64.abs().max(), (float(err), float(err32))


def genie_loop(model, x_T, ts, schedule, *, solver, afs, denoise, dtype):
    """GENIE / DDIM / DPM-Solver++(2M) written from the paper in `dtype` (network, state and
    coefficients), without coeff_table, plans or the step ops: the engine must agree with it."""
    ts = torch.as_tensor(ts, dtype=torch.float64)
    g = schedule.gamma(ts).to(dtype)
    t_in = ts.to(dtype)
    B = x_T.shape[0]
    x_T = x_T.to(dtype)
    x_bar = x_T * (1 + g[0] ** 2).sqrt()
    x0_prev = None
    for n in range(len(ts) - 1):
        x = x_bar / (1 + g[n] ** 2).sqrt()
        t = t_in[n].expand(B)
        deps = 0.0
        if n == 0 and afs:
            eps = x_T
        elif solver == "genie":
            eps, head_out = model.eps_and_head(x, t)
            deps = head_combine_ref(head_out, g[n])
        else:
            eps = model(x, t)
        h = g[n + 1] - g[n]
        if solver == "dpmpp_2m":
            x0 = x_bar - g[n] * eps
            lam = -torch.log(g)
            d = x0
            if n > 0:
                q = (lam[n] - lam[n - 1]) / (lam[n + 1] - lam[n])
                d = (1 + 1 / (2 * q)) * x0 - 1 / (2 * q) * x0_prev
            r = g[n + 1] / g[n]
            x_bar = r * x_bar + (1 - r) * d
            x0_prev = x0
        else:
            x_bar = x_bar + h * eps + h * h / 2 * deps  # GENIE eq. 9 (deps = 0: DDIM)
    if denoise:
        x = x_bar / (1 + g[-1] ** 2).sqrt()
        return x_bar - g[-1] * model(x, t_in[-1].expand(B))
    return x_bar / (1 + g[-1] ** 2).sqrt()


@pytest.mark.parametrize("solver", ALL)
def test_public_sample_is_the_engine(solver):
    """`genie_fast.sample(model, noise=z, solver=S, nfe=N, grid=G)` is `SamplingEngine(model).sample(...)`."""
    model = random_model()
    z = noise_for(model, batch=2)
    for grid in ("auto", "edm"):
        a, nfe_a = genie_fast.sample(model, noise=z, solver=solver, nfe=8, grid=grid, **_kw(solver))
        b, nfe_b = SamplingEngine(model, device="cpu").sample(z, solver=solver, nfe=8, grid=grid, **_kw(solver))
        assert nfe_a == nfe_b and torch.equal(a, b)


def test_discrete_schedule_and_explicit_grid(fake_cuda):
    """model_time of a discrete schedule and a user grid reach the network as in the reference, also
    through a graph (genie_exact's JVP on the discrete schedule reads no host table in the loop)."""
    sched = DiscreteVPSchedule.linear(100)
    model = random_model(schedule=sched)
    x_T = noise_for(model, batch=2)
    ts = [1.0, 0.6, 0.3, 0.1, sched.t_end]
    for solver in ("genie", "genie_exact"):
        for eng in (SamplingEngine(model, device="cpu"), graph_engine(model)):
            x0, nfe = eng.sample(x_T, solver=solver, grid=ts, afs=False)
            ref, nfe_ref = reference(model, x_T, solver, grid=ts, afs=False)
            assert nfe == nfe_ref == nfe_of(solver, 4)
            assert torch.equal(x0, ref) or (solver == "genie_exact" and eng.use_graphs and rel_err(x0, ref) < 1e-6)


# --------------------------------------------------------------------------- steps, nfe, defaults

def test_steps_nfe_and_defaults():
    model = random_model()
    eng = SamplingEngine(model, device="cpu")
    z = noise_for(model, batch=2)
    _, nfe = eng.sample(z, solver="heun", steps=5, afs=False)
    assert nfe == 10 == nfe_of("heun", 5)
    _, nfe = eng.sample(z, solver="genie_exact", steps=3, afs=False)
    assert nfe == 3 * (1 + JVP_NFE)
    key = eng.key(z)  # the defaults: genie_multistep, 10 NFE, its auto grid and AFS
    assert DEFAULT_SOLVER == "genie_multistep"
    want = time_grid(model.schedule, steps_for_nfe(DEFAULT_SOLVER, 10, DEFAULT_AFS), AUTO_GRID[DEFAULT_SOLVER])
    assert key.solver == DEFAULT_SOLVER and key.ts == tuple(want.tolist()) and key.afs == DEFAULT_AFS
    assert eng.key(z, steps=steps_for_nfe(DEFAULT_SOLVER, 10, DEFAULT_AFS)) == key
    with pytest.raises(ValueError, match="not both"):
        eng.sample(z, nfe=10, steps=5)
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        eng.sample(z, steps=0)
    with pytest.raises(ValueError, match="disagrees with the given grid"):
        eng.sample(z, steps=2, grid=[1.0, 0.5, 0.2, 0.01])
    with pytest.raises(ValueError, match="must decrease"):
        eng.sample(z, grid=[0.01, 0.5, 1.0])


def test_one_set_of_defaults():
    """sample(), SamplingEngine.sample and `genie-fast sample` share their defaults."""
    import inspect

    from genie_fast.cli import build_parser

    def defaults(fn, names):
        params = inspect.signature(fn).parameters
        return {n: params[n].default for n in names}

    names = ("solver", "nfe", "steps", "grid", "afs", "denoise", "seed", "dtype", "net_dtype")
    assert defaults(genie_fast.sample, names) == defaults(SamplingEngine.sample, names)
    args = build_parser().parse_args(["sample"])
    cli = {"solver": args.solver, "nfe": args.nfe, "steps": args.steps, "grid": args.grid, "afs": args.afs,
           "denoise": args.denoise, "seed": args.seed, "net_dtype": args.net_dtype}
    assert cli == {k: v for k, v in defaults(genie_fast.sample, names).items() if k != "dtype"}


def test_key_fields_and_equality():
    model = random_model()
    eng = SamplingEngine(model, device="cpu")
    z = noise_for(model, batch=2)
    k = eng.key(z, solver=DEFAULT_SOLVER, nfe=10)
    assert k == eng.key(z.clone(), solver=DEFAULT_SOLVER, nfe=10) and hash(k) == hash(eng.key(z, nfe=10))
    variants = [eng.key(noise_for(model, batch=3)), eng.key(z, net_dtype="fp64"), eng.key(z, dtype="fp64"), eng.key(z, solver="ddim"),
                eng.key(z, nfe=5), eng.key(z, grid="uniform" if AUTO_GRID[DEFAULT_SOLVER] != "uniform" else "edm"),
                eng.key(z, afs=not DEFAULT_AFS), eng.key(z, denoise=True),
                eng.key(z, schedule=VPSchedule(beta_d=20.0)), eng.key(z, solver="unipc", order=3),
                eng.key(z, solver="unipc", order=2)]
    assert all(v != k for v in variants) and len(set(variants)) == len(variants)
    assert k.batch == 2 and k.image_shape == (1, 8, 8) and k.dtype == k.net_dtype == torch.float32
    assert k.tf32 is None  # eager: TF32 flags are read live, not baked


def test_memoised_key_and_plan(monkeypatch):
    """A repeated call builds no grid and no plan: its arguments map to the cached (key, plan)."""
    model = random_model()
    eng = SamplingEngine(model, device="cpu")
    z = noise_for(model, batch=2)
    calls = []
    real_grid = engine_mod.time_grid
    monkeypatch.setattr(engine_mod, "time_grid", lambda *a, **k: (calls.append(a), real_grid(*a, **k))[1])
    a, _ = eng.sample(z, solver="dpmpp_3m", nfe=6)
    plan = eng._plans[eng.key(z, solver="dpmpp_3m", nfe=6)]
    b, _ = eng.sample(noise_for(model, batch=2, seed=9), solver="dpmpp_3m", nfe=6)
    c, _ = eng.sample(z, solver="dpmpp_3m", nfe=6)
    assert len(calls) == 1 and torch.equal(a, c) and not torch.equal(a, b)
    assert eng._plans[eng.key(z, solver="dpmpp_3m", nfe=6)] is plan and "dpmpp_3m" in plan._cache


# --------------------------------------------------------------------------- dtypes, devices, validation

def test_dtype_is_the_state_net_dtype_the_network():
    model = random_model()
    z = noise_for(model, batch=2)
    eng = SamplingEngine(model, device="cpu")
    x64, _ = eng.sample(z, solver="ddim", nfe=4, dtype=torch.float64)
    assert x64.dtype == torch.float64 and next(eng.network(torch.float64).parameters()).dtype == torch.float64
    ref, _ = reference(model.double(), z.double(), "ddim", nfe=4)
    model.float()
    assert torch.equal(x64, ref)  # float64 state and network: the float64 reference run
    mixed, _ = eng.sample(z, solver="ddim", nfe=4, net_dtype="float64")  # float32 state, float64 network
    assert mixed.dtype == torch.float32 and 0 < rel_err(mixed, x64) < 1e-5
    with pytest.raises(ValueError, match="float64 state needs a float64 network"):
        eng.sample(z, dtype=torch.float64, net_dtype="float32")
    with pytest.raises(ValueError, match="refused"):  # bf16 on the CPU: tests/test_cpu_path.py
        SamplingEngine(model, device="cpu", net_dtype=torch.float16)
    with pytest.raises(ValueError, match="the network's precision is net_dtype"):
        eng.sample(z, dtype=torch.float16)
    with pytest.raises(ValueError, match="unknown net_dtype"):
        eng.sample(z, net_dtype="fp8")


@pytest.mark.parametrize("solver", ALL)
def test_device_moves_any_model_for_every_solver(solver):
    """device= means the same for every solver: a CPU model sampled on another device (here "meta",
    where tensors have no data) is copied there, and the samples come back on that device."""
    model = random_model()
    x, nfe = genie_fast.sample(model, n=2, solver=solver, steps=3, device="meta", **_kw(solver))
    assert x.device.type == "meta" and x.shape == (2, 1, 8, 8) and nfe == nfe_of(solver, 3, DEFAULT_AFS)
    assert next(model.parameters()).device.type == "cpu"  # the user's model is not moved


def test_validation_errors():
    model = random_model()
    eng = SamplingEngine(model, device="cpu")
    z = noise_for(model, batch=2)
    with pytest.raises(ValueError, match="unknown solver"):
        eng.sample(z, solver="euler")
    with pytest.raises(TypeError, match="floating-point"):
        eng.sample(torch.zeros(2, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, C, \.\.\.\)"):
        eng.sample(torch.randn(8))
    with pytest.raises(ValueError, match="nfe must be >= 1, got 0"):
        eng.sample(z, nfe=0)
    with pytest.raises(ValueError, match="over nfe"):
        eng.sample(z, nfe=2, grid=[1.0, 0.5, 0.2, 0.01], afs=False)
    with pytest.raises(ValueError, match="zero times"):
        eng.sample(z, grid=[1.0, 0.01], afs=True)
    with pytest.raises(ValueError, match="give noise"):
        eng.sample()
    with pytest.raises(ValueError, match="noise must have shape"):
        eng.sample(torch.randn(2, 1, 4, 4))
    with pytest.raises(TypeError, match="hashable"):
        eng.sample(z, solver="unipc", order=[2])
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        SamplingEngine(model, device="cpu", use_graphs=True)
    with pytest.raises(ValueError, match="max_graphs"):
        SamplingEngine(model, device="cpu", max_graphs=0)
    with pytest.raises(ValueError, match="unknown backend"):
        SamplingEngine(model, device="cpu", backend="fast")
    with pytest.raises(TypeError, match="callable"):
        SamplingEngine(None)
    with pytest.raises(TypeError, match="eps_and_head"):
        SamplingEngine(model.unet, device="cpu").sample(z, solver="genie")
    if not CUDA:
        with pytest.raises(ValueError, match="no CUDA GPU"):
            SamplingEngine(model, device="cuda")


def test_plain_callable_and_eps_network():
    """Any eps model the reference solvers accept: a bare U-Net and a plain function."""
    model = random_model()
    z = noise_for(model, batch=2)
    x0, _ = SamplingEngine(model.unet, device="cpu").sample(z, solver="ddim", nfe=4)
    ref, _ = reference(model.unet, z, "ddim", nfe=4)
    assert torch.equal(x0, ref)

    def eps_fn(x, t):
        return 0.5 * x * t.view(-1, 1, 1, 1)

    eps_fn.schedule = VPSchedule()
    x0, nfe = SamplingEngine(eps_fn, device="cpu").sample(z, solver="dpmpp_2m", nfe=3)
    ref, _ = reference(eps_fn, z, "dpmpp_2m", nfe=3)
    assert nfe == 3 and torch.equal(x0, ref)


def test_seeded_noise_reproducible_and_shared_with_sample():
    from genie_fast.sampling import make_noise

    model = random_model()
    eng = SamplingEngine(model, device="cpu")
    a, _ = eng.sample(n=2, seed=7, nfe=3)
    b, _ = eng.sample(n=2, seed=7, nfe=3)
    c, _ = eng.sample(n=2, seed=8, nfe=3)
    d, _ = eng.sample(make_noise(2, (1, 8, 8), 7), nfe=3)
    assert torch.equal(a, b) and torch.equal(a, d) and not torch.equal(a, c)


# --------------------------------------------------------------------------- weights and buffers

def test_copied_weights_refreshed_in_place(fake_cuda):
    """A model not on the device in net_dtype is copied; in-place changes of its weights reach the
    copy before the next call (same addresses), eager and replayed."""
    model = random_model()
    z = noise_for(model, batch=2)
    for eng in (SamplingEngine(model, device="cpu", net_dtype="fp64"), graph_engine(model, net_dtype="fp64")):
        before, _ = eng.sample(z, nfe=3)
        net = eng.network()
        assert net is not model and next(net.parameters()).dtype == torch.float64
        ptr = next(net.parameters()).data_ptr()
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.9)
        after, _ = eng.sample(z, nfe=3)
        fresh, _ = SamplingEngine(model, device="cpu", net_dtype="fp64").sample(z, nfe=3)
        assert not torch.equal(before, after) and torch.equal(after, fresh)
        assert next(eng.network().parameters()).data_ptr() == ptr and eng.stats["weight_refreshes"] == 1
        with torch.no_grad():
            for p in model.parameters():
                p.div_(0.9)
    assert fake_cuda["captures"] and all(c[0].replays == 2 for c in fake_cuda["captures"])


def test_model_used_as_is_is_read_live(fake_cuda):
    """A model already on the device in net_dtype is not copied: in-place changes are read live by
    the next replay; replacing its tensors (model.double()) is noticed and everything is remade."""
    model = random_model()
    z = noise_for(model, batch=2)
    eng = graph_engine(model)
    before, _ = eng.sample(z, nfe=3)
    assert eng.network() is model
    with torch.no_grad():
        model.unet.conv_in.weight.mul_(1.5)
    after, _ = eng.sample(z, nfe=3)
    ref, _ = reference(model, z, DEFAULT_SOLVER, nfe=3)
    assert eng.stats["captures"] == 1 and not torch.equal(before, after) and torch.equal(after, ref)
    model.double()
    x64, _ = eng.sample(z.double(), nfe=3)
    assert eng.stats["refreshes"] == 1 and eng.stats["captures"] == 2 and x64.dtype == torch.float64
    model.float()


@pytest.mark.parametrize("copied", [False, True])
def test_guidance_wrapper_buffers_updated_in_place_replay_the_same_graph(fake_cuda, copied):
    """A guidance wrapper (doubled batch, labels and scale in its own buffers, updated in place between
    calls) is captured like any model; a later call with new buffer values replays the same graph
    and gives the new labels' samples; its NFE counts 2 evaluations per call."""
    model = random_model("tiny_cond")
    z = noise_for(model, batch=2)
    wrapper = Conditioned(model, torch.tensor([1, 2]), 3.0)
    eng = graph_engine(wrapper, **({"net_dtype": "fp64"} if copied else {}))
    steps = steps_for_nfe("genie", 10, DEFAULT_AFS, evals_per_call=2)
    a, nfe = eng.sample(z, solver="genie", nfe=10)
    assert nfe == nfe_of("genie", steps, DEFAULT_AFS, evals_per_call=2) == 2 * nfe_of("genie", steps,
                                                                                           DEFAULT_AFS)
    net_dtype = torch.float64 if copied else torch.float32
    ref_a, _ = reference(Conditioned(model, torch.tensor([1, 2]), 3.0).to(net_dtype), z, "genie", steps=steps,
                         net_dtype=net_dtype)
    wrapper.update(torch.tensor([7, 0]), 1.5)
    b, _ = eng.sample(z, solver="genie", nfe=10)
    ref_b, _ = reference(Conditioned(model, torch.tensor([7, 0]), 1.5).to(net_dtype), z, "genie", steps=steps,
                         net_dtype=net_dtype)
    assert eng.stats["captures"] == 1 and eng.stats["replays"] == 2
    assert rel_err(a, ref_a) < 1e-6 and rel_err(b, ref_b) < 1e-6 and rel_err(a, b) > 1e-3


def test_first_call_under_inference_mode(fake_cuda):
    """A first call under torch.inference_mode() leaves no inference tensors behind: later calls
    outside it (weights refreshed in place, a replay, genie_exact's JVP) still work."""
    model = random_model()
    z = noise_for(model, batch=2)
    eng = graph_engine(model, net_dtype="fp64")
    with torch.inference_mode():
        a, _ = eng.sample(z, solver="genie_exact", steps=2)
        assert not a.is_inference() and not next(eng.network().parameters()).is_inference()
    with torch.no_grad():
        model.unet.conv_in.weight.mul_(1.1)
    b, _ = eng.sample(z, solver="genie_exact", steps=2)
    c, _ = SamplingEngine(model, device="cpu", net_dtype="fp64").sample(z, solver="genie_exact", steps=2)
    assert eng.stats["captures"] == 1 and torch.equal(b, c) and not torch.equal(a, b)


def test_tf32_flags_are_in_the_key_of_fp32_graphs(fake_cuda):
    """An fp32 graph captured with TF32 would replay TF32 kernels after TF32 is switched off."""
    model = random_model()
    eng = graph_engine(model)
    z = noise_for(model, batch=2)
    cudnn = torch.backends.cudnn
    old = cudnn.allow_tf32
    try:
        cudnn.allow_tf32 = True
        k1 = eng.key(z)
        eng.sample(z, nfe=3)
        cudnn.allow_tf32 = False
        k2 = eng.key(z)
        eng.sample(z, nfe=3)
        assert k1 != k2 and k1.tf32 != k2.tf32 and eng.stats["captures"] == 2
        assert eng.key(z, net_dtype="fp64").tf32 is None
    finally:
        cudnn.allow_tf32 = old


# --------------------------------------------------------------------------- cache logic (stand-in)

def test_lru_cache_recaptures_on_key_change(fake_cuda):
    model = random_model()
    eng = graph_engine(model, max_graphs=2)
    eager = SamplingEngine(model, device="cpu")
    z2, z3 = noise_for(model, batch=2), noise_for(model, batch=3)
    a, _ = eng.sample(z2, nfe=3)
    assert torch.equal(a, eager.sample(z2, nfe=3)[0])
    z2b = make_noise(2, (1, 8, 8), seed=5)
    b, _ = eng.sample(z2b, nfe=3)  # same key: replay with new noise, no capture
    assert eng.stats["captures"] == 1 and torch.equal(b, eager.sample(z2b, nfe=3)[0])
    c, _ = eng.sample(z3, nfe=3)   # batch changed: a new graph
    d, _ = eng.sample(z2, nfe=4)   # NFE changed: a new graph, the oldest (batch 2, nfe 3) goes
    assert eng.stats["captures"] == 3 and eng.stats["evictions"] == 1 and len(eng._graphs) == 2
    assert torch.equal(d, eager.sample(z2, nfe=4)[0]) and torch.equal(c, eager.sample(z3, nfe=3)[0])
    e, _ = eng.sample(z2, nfe=3)   # evicted key: captured again, never stale
    assert eng.stats["captures"] == 4 and torch.equal(e, a)
    e_copy = e.clone()
    eng.sample(z2b, nfe=3)         # a later replay does not change what an earlier call returned
    assert torch.equal(e, e_copy)
    assert len({id(c[1]) for c in fake_cuda["captures"]}) == 1  # one shared pool


class _Syncing(nn.Module):
    """An eps model that reads a device value on the host: it cannot be captured."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))

    def forward(self, x, t):
        return float(self.w.abs().max()) * x


def test_uncapturable_model_falls_back_to_eager_once(fake_cuda):
    model = _Syncing()
    eng = graph_engine(model)
    z = torch.randn(2, 1, 4, 4)
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        x, _ = eng.sample(z, solver="ddim", nfe=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, _ = eng.sample(z, solver="ddim", nfe=3)
        eng.sample(z, solver="ddim", nfe=4)  # another key fails too, but the warning was said once
    ref, _ = SamplingEngine(model, device="cpu").sample(z, solver="ddim", nfe=3)
    assert torch.equal(x, y) and torch.equal(x, ref)
    assert eng.stats["capture_failures"] == 2 and eng.stats["eager_runs"] == 3


# --------------------------------------------------------------------------- precision facts, attention

def _groupnorm_offset_check(device, dtype, unit_roundoff):
    """The engine's half-precision copy (`_converted_copy`) of a U-Net ResBlock, fed activations with
    mean 100 and std 1 (as deep features can be): its GroupNorm must accumulate mean and variance in
    float32 (ATen does for fp16/bf16 inputs, and the engine relies on that instead of upcasting
    the norms); statistics held in half precision lose the variance (E[x^2] ~ 1e4 has a spacing
    of 64 in bf16) and the normalised activations with it. Compared: the block's first stage,
    conv0(silu(norm0(x))), against float32 (the skip path would hide the norm's error under the
    rounding of x ~ 100)."""
    import torch.nn.functional as F

    from genie_fast.models.unet import ResBlock

    block = ResBlock(32, 32, 16, 0.0).eval()
    randomize(block, std=0.2)
    x = (100 + torch.randn(4, 32, 8, 8, generator=torch.Generator().manual_seed(0))).to(dtype).float()
    with torch.no_grad():
        ref = block.conv0(F.silu(block.norm0(x)))
        half = engine_mod._converted_copy(block, device, dtype)
        out = half.conv0(F.silu(half.norm0(x.to(device, dtype)))).float().cpu()
    assert (out - ref).abs().max() < 32 * unit_roundoff * ref.abs().max(), float((out - ref).abs().max())


def test_groupnorm_statistics_in_float32_for_half_inputs():
    _groupnorm_offset_check("cpu", torch.bfloat16, 2.0 ** -8)


def test_attention_gets_4d_inputs_with_unit_last_stride(monkeypatch):
    """The fused attention kernels need (B, heads, L, D) with a contiguous last dimension; 3-D
    inputs send fp16 to the math path. The 4-D block computes what the 3-D one did."""
    import math

    import torch.nn.functional as F

    from genie_fast.models import unet as unet_mod

    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        seen.append([(t.dim(), t.stride(-1)) for t in (q, k, v)])
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(unet_mod.F, "scaled_dot_product_attention", spy)
    block = unet_mod.AttnBlock(16)
    nn.init.normal_(block.proj.weight)
    x = torch.randn(3, 16, 5, 7)
    out = block(x)
    assert seen == [[(4, 1)] * 3]
    B, C, H, W = x.shape
    q, k, v = block.qkv(block.norm(x)).reshape(B, 3, C, H * W).unbind(1)
    h = real(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    want = (x + block.proj(h.transpose(1, 2).reshape(B, C, H, W))) / math.sqrt(2.0)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- NVTX ranges

def test_nvtx_ranges_eager(monkeypatch):
    """Eager runs emit sample > step > network (> head); the ranges nest correctly."""
    events = []
    rec_push = lambda name: events.append(("push", name))  # noqa: E731
    rec_pop = lambda: events.append(("pop", None))  # noqa: E731
    for mod in (engine_mod, solvers_mod):
        monkeypatch.setattr(mod, "push", rec_push)
        monkeypatch.setattr(mod, "pop", rec_pop)

    @contextlib.contextmanager
    def recording_range(name):
        rec_push(name)
        try:
            yield
        finally:
            rec_pop()

    monkeypatch.setattr(engine_mod, "nvtx_range", recording_range)
    model = random_model()
    SamplingEngine(model, device="cpu").sample(noise_for(model, batch=2), solver="genie", steps=4, afs=True,
                                               denoise=True)
    names = [n for kind, n in events if kind == "push"]
    assert names.count("sample") == 1 and names.count("step") == 5       # 4 steps + denoising
    assert names.count("network") == 4 and names.count("head") == 3     # AFS step: no network
    depth = 0
    for kind, _ in events:
        depth += 1 if kind == "push" else -1
        assert depth >= 0
    assert depth == 0
    assert all(not h for h in (model.head._forward_hooks, model.head._forward_pre_hooks))


def test_profiling_noop_cost():
    """With no profiler attached a range pair costs about a microsecond (measured 0.7-0.8 us, the nvtx
    package's dummy domain or switched off); switched off, push/pop are the no-op function and a pair
    costs a few bare ``nullcontext`` pairs (measured 3.8x). Best of 7 runs: load only adds time."""
    import time

    from genie_fast import profiling

    def per_pair_us(make):
        best = float("inf")
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(2000):
                with make("step"):
                    pass
            best = min(best, (time.perf_counter() - t0) / 2000 * 1e6)
        return best

    assert per_pair_us(profiling.nvtx_range) < 5.0  # the emitter picked at import (none attached here)
    before = profiling.emitter()
    try:
        assert profiling.configure("off") is None
        assert profiling._push is profiling._noop and profiling._pop is profiling._noop
        bare = per_pair_us(lambda name: contextlib.nullcontext())
        ratio = per_pair_us(profiling.nvtx_range) / bare
        assert ratio < 8.0, ratio
    finally:
        profiling.configure({None: "off", "nvtx": "nvtx", "torch.cuda.nvtx": "torch"}[before])


def test_default_model_engine_matches_reference():
    """The bundled model: the engine (used as is on the CPU) equals the reference solver."""
    from genie_fast.models import load_default

    model = load_default()
    z = make_noise(2, model.image_shape, seed=3)
    x0, nfe = SamplingEngine(model, device="cpu").sample(z, solver="genie", nfe=4)
    ref, nfe_ref = reference(model, z, "genie", nfe=4)
    assert nfe == nfe_ref and torch.equal(x0, ref)


@pytest.fixture
def no_tf32():
    """True float32 references: cuDNN's TF32 off for the test, restored after."""
    with engine_mod.no_tf32():
        yield


def test_no_tf32_restores_flags():
    b = torch.backends
    before = (b.cudnn.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision,
              b.cuda.matmul.fp32_precision)
    with engine_mod.no_tf32():
        assert b.cudnn.conv.fp32_precision != "tf32"
    assert (b.cudnn.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision,
            b.cuda.matmul.fp32_precision) == before


# --------------------------------------------------------------------------- host syncs

def sample_twice_sync_checked(eng, z, solver):
    """A warm call's loop under torch.cuda.set_sync_debug_mode("error") (a host sync in it raises on
    a GPU): the first call copies the weights and fills the plan; the second runs inside the window
    with check_finite=False; its finiteness check, the one host sync of a call, comes after."""
    eng.sample(z, solver=solver, nfe=6, **_kw(solver))
    if z.is_cuda:
        torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x, _ = eng.sample(z, solver=solver, nfe=6, check_finite=False, **_kw(solver))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(torch.isfinite(x).all())
    return x


class _SyncDebug(TorchDispatchMode):
    """CPU stand-in of CUDA's sync-debug mode: torch.cuda.set_sync_debug_mode / get_sync_debug_mode
    are patched to set and read `mode`; while it is "error", an op that reads a tensor's value on the
    host (on a GPU: a device-to-host sync, e.g. .item(), bool(t), nonzero) raises as CUDA does.
    Every op is logged (by name) in `ops`."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.mode, self.ops = "default", []
        monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", self._set)
        monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: self.mode)

    def _set(self, mode):
        self.mode = mode

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.ops.append(name)
        if self.mode in ("error", 2) and name in RecordingGraph.SYNCS:
            raise RuntimeError(f"called a synchronizing CUDA operation ({name})")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("solver", ALL)
def test_eager_loop_has_no_host_sync(monkeypatch, solver):
    """What test_cuda_eager_loop_has_no_host_sync runs, on the CPU with the sync-debug stand-in:
    no solver's loop reads a value on the host, and the test's window holds the loop only."""
    model = random_model("tiny")
    with _SyncDebug(monkeypatch) as sd:
        sample_twice_sync_checked(SamplingEngine(model, device="cpu"), noise_for(model, batch=2), solver)
    assert sd.mode == "default" and sd.ops.count("aten::_local_scalar_dense") >= 2  # the checks ran


def test_sync_debug_stand_in_catches_the_finiteness_check(monkeypatch):
    """The stand-in is not vacuous: a call with the default check_finite=True inside the window
    raises, as it does on a GPU (its check is a host sync)."""
    model = random_model("tiny")
    eng, z = SamplingEngine(model, device="cpu"), noise_for(model, batch=2)
    eng.sample(z, nfe=6)
    with _SyncDebug(monkeypatch):
        torch.cuda.set_sync_debug_mode("error")
        with pytest.raises(RuntimeError, match="synchronizing"):
            eng.sample(z, nfe=6)
        eng.sample(z, nfe=6, check_finite=False)


@pytest.mark.parametrize("graphs", [False, True])
def test_finiteness_check_is_one_reduction_after_the_loop(monkeypatch, fake_cuda, graphs):
    """A warm call's only host read is its finiteness check, one reduction over the result after the
    loop (eager and graph path): isfinite's elementwise ops, all, then the one read, nothing after."""
    model = random_model("tiny")
    eng = graph_engine(model) if graphs else SamplingEngine(model, device="cpu")
    z = noise_for(model, batch=2)
    for solver in ALL:
        eng.sample(z, solver=solver, nfe=6, **_kw(solver))
        with _SyncDebug(monkeypatch) as sd:
            eng.sample(z, solver=solver, nfe=6, **_kw(solver))
        syncs = [i for i, name in enumerate(sd.ops) if name in RecordingGraph.SYNCS]
        assert syncs == [len(sd.ops) - 1], (solver, [sd.ops[i] for i in syncs])
        assert sd.ops[-2] == "aten::all", (solver, sd.ops[-4:])  # (isfinite dispatches as eq, abs, ...)
        assert len(sd.ops) > 20, solver  # the loop's ops were seen before it


# --------------------------------------------------------------------------- CUDA

@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("solver", ALL)
def test_cuda_graph_replay_equals_eager(solver, no_tf32):
    """The captured graph runs the same kernels as the eager loop: with fp32 (TF32 off) the results
    agree to a few float32 ulps; a stale or wrong buffer would differ by O(1)."""
    model = random_model("fmnist_small")
    z = noise_for(model, batch=4).cuda()
    graph_eng = SamplingEngine(model, device="cuda", net_dtype="fp32")
    eager_eng = SamplingEngine(model, device="cuda", net_dtype="fp32", use_graphs=False)
    z2 = make_noise(4, (1, 32, 32), seed=11).cuda()
    g1, _ = graph_eng.sample(z, solver=solver, nfe=10, **_kw(solver))
    g2, _ = graph_eng.sample(z2, solver=solver, nfe=10, **_kw(solver))
    e1, _ = eager_eng.sample(z, solver=solver, nfe=10, **_kw(solver))
    e2, _ = eager_eng.sample(z2, solver=solver, nfe=10, **_kw(solver))
    assert graph_eng.stats["captures"] == 1 and graph_eng.stats["replays"] == 2
    assert graph_eng.stats["capture_failures"] == 0
    assert rel_err(g1, e1) < GRAPH_VS_EAGER_FP32_BOUND and rel_err(g2, e2) < GRAPH_VS_EAGER_FP32_BOUND, (
        rel_err(g1, e1), rel_err(g2, e2))
    h_graph, _ = SamplingEngine(model, device="cuda").sample(z, solver=solver, nfe=10, **_kw(solver))
    h_eager, _ = SamplingEngine(model, device="cuda", use_graphs=False).sample(z, solver=solver, nfe=10,
                                                                               **_kw(solver))
    assert rel_err(h_graph, h_eager) < graph_vs_eager_half_bound(solver)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("solver", ALL)
def test_cuda_fp16_graph_vs_fp32_eager(solver, no_tf32):
    model = random_model("fmnist_small")
    z = noise_for(model, batch=8).cuda()
    ref, _ = SamplingEngine(model, device="cuda", net_dtype="fp32", use_graphs=False).sample(
        z, solver=solver, nfe=10, **_kw(solver))
    x16, _ = SamplingEngine(model, device="cuda", net_dtype="fp16").sample(z, solver=solver, nfe=10, **_kw(solver))
    xbf, _ = SamplingEngine(model, device="cuda", net_dtype="bf16").sample(z, solver=solver, nfe=10, **_kw(solver))
    fp16_bound, bf16_bound = half_bounds(solver)
    assert 0 < rel_err(x16, ref) < fp16_bound, rel_err(x16, ref)
    assert 0 < rel_err(xbf, ref) < bf16_bound, rel_err(xbf, ref)


@pytest.mark.cuda
@needs_cuda
def test_cuda_recapture_on_key_change_and_weights():
    model = random_model("tiny")
    eng = SamplingEngine(model, device="cuda", max_graphs=2)
    eager = SamplingEngine(model, device="cuda", use_graphs=False)
    z2, z3 = noise_for(model, batch=2).cuda(), noise_for(model, batch=3).cuda()
    a, _ = eng.sample(z2, nfe=4)
    eng.sample(z3, nfe=4)
    eng.sample(z2, nfe=5)                       # third key: evicts (batch 2, nfe 4)
    assert eng.stats["captures"] == 3 and eng.stats["evictions"] == 1
    a2, _ = eng.sample(z2, nfe=4)               # recaptured into the shared pool
    assert eng.stats["captures"] == 4 and torch.equal(a, a2)
    assert rel_err(a2, eager.sample(z2, nfe=4)[0]) < graph_vs_eager_half_bound(DEFAULT_SOLVER)
    with torch.no_grad():                       # in-place weight change: graphs stay, values refresh
        for p in model.parameters():
            p.mul_(0.9)
    b, _ = eng.sample(z2, nfe=4)
    assert eng.stats["captures"] == 4 and not torch.equal(a2, b)
    assert rel_err(b, eager.sample(z2, nfe=4)[0]) < graph_vs_eager_half_bound(DEFAULT_SOLVER)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("solver", ALL)
def test_cuda_eager_loop_has_no_host_sync(solver):
    model = random_model("tiny")
    sample_twice_sync_checked(SamplingEngine(model, device="cuda", use_graphs=False),
                              noise_for(model, batch=2).cuda(), solver)


@pytest.mark.cuda
@needs_cuda
def test_cuda_uncapturable_model_falls_back_to_eager():
    model = _Syncing()
    eng = SamplingEngine(model, device="cuda")
    z = torch.randn(2, 1, 4, 4, device="cuda")
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        x, _ = eng.sample(z, solver="ddim", nfe=3)
    y, _ = SamplingEngine(model, device="cuda", use_graphs=False).sample(z, solver="ddim", nfe=3)
    assert torch.equal(x, y) and eng.stats["capture_failures"] == 1


@pytest.mark.cuda
@needs_cuda
def test_cuda_groupnorm_fp16_statistics():
    _groupnorm_offset_check("cuda", torch.float16, 2.0 ** -11)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("solver", ALL)
def test_cuda_public_sample_of_a_cpu_model(solver):
    """A user's CPU model with device="cuda": every solver runs as an fp16 graph on a copy."""
    model = random_model("tiny")
    z = noise_for(model, batch=2)
    x_gpu, nfe = genie_fast.sample(model, noise=z, solver=solver, nfe=8, device="cuda", **_kw(solver))
    x_cpu, nfe_cpu = genie_fast.sample(model, noise=z, solver=solver, nfe=8, **_kw(solver))
    eng = engine_mod.engine_for(model, "cuda")
    assert eng.stats["captures"] == 1 and eng.stats["replays"] == 1 and nfe == nfe_cpu
    assert x_gpu.is_cuda and rel_err(x_gpu.cpu(), x_cpu) < half_bounds(solver)[0]
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.cuda
@needs_cuda
def test_cuda_guidance_wrapper_replays_with_new_buffers():
    model = random_model("tiny_cond").cuda()
    z = noise_for(model, batch=2).cuda()
    wrapper = Conditioned(model, torch.tensor([1, 2], device="cuda"), 3.0)
    eng = SamplingEngine(wrapper, device="cuda")
    a, _ = eng.sample(z, solver="genie", nfe=10)
    wrapper.update(torch.tensor([7, 0], device="cuda"), 1.5)
    b, _ = eng.sample(z, solver="genie", nfe=10)
    ref_b, _ = SamplingEngine(Conditioned(model, torch.tensor([7, 0], device="cuda"), 1.5), device="cuda",
                              use_graphs=False).sample(z, solver="genie", nfe=10)
    assert eng.stats["captures"] == 1 and eng.stats["replays"] == 2
    assert rel_err(b, ref_b) < graph_vs_eager_half_bound(DEFAULT_SOLVER) and rel_err(a, b) > 1e-3
