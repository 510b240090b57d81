"""The sampling engine (genie_fast/engine.py): eager path against the reference solvers and an
independent float64 loop, key and cache rules, weight refresh, validation, NVTX ranges; CUDA graph
parts marked `cuda` (they skip without a GPU)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from genie_fast import engine as engine_mod
from genie_fast.engine import SamplingEngine, _Entry, draw_noise
from genie_fast.models.head import GenieModel
from genie_fast.models.unet import UNet
from genie_fast.ops import head_combine_ref
from genie_fast.schedule import DiscreteVPSchedule, VPSchedule, time_grid
from genie_fast.solvers import SOLVERS, steps_for_nfe

SOLVER_NAMES = ("genie", "ddim", "dpmpp_2m")
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# Half-precision network against the fp32 network (TF32 off), relative L2 error of x0.
# Measured on the CPU (bench/RESULTS.md, "Sampling engine"; NFE 10, genie/ddim/dpmpp_2m, random
# weights): fp16 at most 5.6e-4 (tiny, fmnist_small U-Nets), bf16 at most 4.5e-3 (those two and the
# DDPM++ deep U-Net, 3.6e-3). Each bound is about 3.5 times the largest measured error: GPU kernels
# add up in other orders than the CPU's, and a real fault (a stale buffer, a wrong step, fp16
# overflow) gives errors of order 1.
FP16_REL_BOUND = 2e-3
BF16_REL_BOUND = 1.6e-2


def random_model(config="tiny", seed=0, schedule=None):
    """A GenieModel whose zero-initialised output layers get PyTorch's default init (so eps and the
    head are far from zero and every layer matters)."""
    torch.manual_seed(seed)
    m = GenieModel(UNet(config), schedule=schedule)
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            mod.reset_parameters()
    return m.eval()


def noise_for(model, batch=3, seed=1):
    c = model.unet.config
    return draw_noise(batch, (c.in_channels, c.image_size, c.image_size), seed)


def rel_err(x, ref):
    return float((x.double() - ref.double()).norm() / ref.double().norm())


# --------------------------------------------------------------------------- an independent loop

def genie_loop(model, x_T, ts, schedule, *, solver, afs, denoise, dtype):
    """GENIE / DDIM / DPM-Solver++(2M) written from docs/method.md in `dtype` (network, state and
    coefficients), without coeff_table or the step ops: the engine must agree with it."""
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


@pytest.mark.parametrize("solver", SOLVER_NAMES)
@pytest.mark.parametrize("afs,denoise", [(False, False), (True, True)])
def test_eager_fp32_matches_float64_loop(solver, afs, denoise):
    """FlashAttention's rule: the engine's fp32 error against the float64 loop is at most twice the
    error of that same loop run in float32, plus a small atol."""
    model = random_model()
    x_T = noise_for(model)
    eng = SamplingEngine(model, device="cpu")
    x0, nfe = eng.sample(x_T, solver=solver, nfe=6, afs=afs, denoise=denoise)
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


@pytest.mark.parametrize("solver", SOLVER_NAMES)
@pytest.mark.parametrize("afs,denoise", [(False, False), (True, True), (True, False)])
def test_eager_equals_reference_solver(solver, afs, denoise):
    """Same ops in the same order as genie_fast.solvers: the results are bitwise equal on the CPU."""
    model = random_model()
    x_T = noise_for(model)
    x0, nfe = SamplingEngine(model, device="cpu").sample(x_T, solver=solver, nfe=5, afs=afs, denoise=denoise)
    ts = time_grid(model.schedule, steps_for_nfe(solver, 5, afs, denoise))
    with torch.no_grad():
        ref, nfe_ref = SOLVERS[solver](model, x_T, ts, model.schedule, afs=afs, denoise=denoise)
    assert nfe == nfe_ref
    assert torch.equal(x0, ref), rel_err(x0, ref)


def test_discrete_schedule_and_explicit_grid():
    """model_time of a discrete schedule and a user grid reach the network as in the reference."""
    sched = DiscreteVPSchedule.linear(100)
    model = random_model(schedule=sched)
    x_T = noise_for(model, batch=2)
    ts = [1.0, 0.6, 0.3, 0.1, sched.t_end]
    x0, nfe = SamplingEngine(model, device="cpu").sample(x_T, solver="genie", nfe=None, grid=ts)
    with torch.no_grad():
        ref, nfe_ref = SOLVERS["genie"](model, x_T, ts, sched)
    assert nfe == nfe_ref == 4 and torch.equal(x0, ref)


def test_public_sample_cpu_path_unchanged():
    """genie_fast.sample on the CPU still runs the reference solver (the engine hooks in on CUDA)."""
    import genie_fast

    model = random_model()
    x_T = noise_for(model, batch=2)
    x0, nfe = genie_fast.sample(model, noise=x_T, solver="genie", nfe=4)
    ts = time_grid(model.schedule, 4)
    with torch.no_grad():
        ref, _ = SOLVERS["genie"](model, x_T, ts, model.schedule)
    assert nfe == 4 and torch.equal(x0, ref)


def test_bf16_network_error_within_bound():
    """bf16 network with a float32 state: the sample error against fp32 stays in the measured bound,
    and it is not zero (the bf16 copy really runs in bf16)."""
    model = random_model("tiny")
    x_T = noise_for(model, batch=4)
    eng = SamplingEngine(model, device="cpu")
    ref, _ = eng.sample(x_T, solver="genie", nfe=10)
    x, _ = eng.sample(x_T, solver="genie", nfe=10, dtype="bf16")
    assert next(eng.network(torch.bfloat16).parameters()).dtype == torch.bfloat16
    assert 0 < rel_err(x, ref) < BF16_REL_BOUND


def test_groupnorm_statistics_in_float32_for_half_inputs():
    """The engine relies on ATen's GroupNorm accumulating mean and variance in float32 for half
    inputs. Data with mean 100 and std 1 (already rounded to bf16) would lose the variance
    entirely in a bf16 accumulation; in float32 the result is the fp32 GroupNorm up to output
    rounding (bf16 unit roundoff 2^-8, outputs of size ~3)."""
    x = (100 + torch.randn(4, 32, 8, 8, generator=torch.Generator().manual_seed(0))).to(torch.bfloat16)
    gn = nn.GroupNorm(8, 32, eps=1e-6)
    ref = gn(x.float())
    out = gn.to(torch.bfloat16)(x).float()
    assert (out - ref).abs().max() < 4 * 2.0 ** -8 * ref.abs().max()


# --------------------------------------------------------------------------- keys and validation

def test_key_fields_and_equality():
    model = random_model()
    eng = SamplingEngine(model, device="cpu")
    z = noise_for(model, batch=2)
    k = eng.key(z, solver="genie", nfe=10)
    assert k == eng.key(z.clone(), solver="genie", nfe=10) and hash(k) == hash(eng.key(z, nfe=10))
    variants = [eng.key(noise_for(model, batch=3)), eng.key(torch.randn(2, 1, 16, 16)),
                eng.key(z, dtype="bf16"), eng.key(z, solver="ddim"), eng.key(z, nfe=5),
                eng.key(z, grid="uniform"), eng.key(z, afs=True), eng.key(z, denoise=True),
                eng.key(z, schedule=VPSchedule(beta_d=20.0))]
    assert all(v != k for v in variants) and len(set(variants)) == len(variants)
    assert k.batch == 2 and k.image_shape == (1, 8, 8) and k.dtype == torch.float32 and len(k.ts) == 11


def test_validation_errors():
    model = random_model()
    eng = SamplingEngine(model, device="cpu")
    z = noise_for(model, batch=2)
    with pytest.raises(ValueError, match="runs solvers"):
        eng.sample(z, solver="heun")
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        eng.sample(z, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown network dtype"):
        eng.sample(z, dtype="fp8")
    with pytest.raises(TypeError, match="floating-point"):
        eng.sample(torch.zeros(2, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, C, \.\.\.\)"):
        eng.sample(torch.randn(8))
    with pytest.raises(ValueError, match="too small"):
        eng.sample(z, nfe=0)
    with pytest.raises(ValueError, match="over nfe"):
        eng.sample(z, nfe=2, grid=[1.0, 0.5, 0.2, 0.01])
    with pytest.raises(ValueError, match="zero times"):
        eng.sample(z, nfe=None, grid=[1.0, 0.01], afs=True)
    with pytest.raises(ValueError, match="give noise"):
        eng.sample()
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        SamplingEngine(model, device="cpu", use_graphs=True)
    with pytest.raises(ValueError, match="max_graphs"):
        SamplingEngine(model, device="cpu", max_graphs=0)
    with pytest.raises(ValueError, match="unknown backend"):
        SamplingEngine(model, device="cpu", backend="fast")
    with pytest.raises(TypeError, match="callable"):
        SamplingEngine(None)
    plain = model.unet  # an eps network without a head
    with pytest.raises(TypeError, match="eps_and_head"):
        SamplingEngine(plain, device="cpu").sample(z, solver="genie")
    if not CUDA:
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            SamplingEngine(model, device="cuda")


def test_plain_callable_and_eps_network():
    """Any eps model the reference solvers accept: a bare U-Net (ddim) and a plain function."""
    model = random_model()
    z = noise_for(model, batch=2)
    x0, _ = SamplingEngine(model.unet, device="cpu").sample(z, solver="ddim", nfe=4)
    ts = time_grid(model.schedule, 4)
    with torch.no_grad():
        ref, _ = SOLVERS["ddim"](model.unet, z, ts, VPSchedule())
    assert torch.equal(x0, ref)

    def eps_fn(x, t):
        return 0.5 * x * t.view(-1, 1, 1, 1)

    x0, nfe = SamplingEngine(eps_fn, device="cpu").sample(z, solver="dpmpp_2m", nfe=3)
    ref, _ = SOLVERS["dpmpp_2m"](eps_fn, z, time_grid(VPSchedule(), 3), VPSchedule())
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


def test_weights_refreshed_in_place():
    """An in-place change of the model's weights reaches the engine's copies before the next call."""
    model = random_model()
    z = noise_for(model, batch=2)
    eng = SamplingEngine(model, device="cpu", dtype="bf16")
    before, _ = eng.sample(z, nfe=3)
    copy_param = next(eng.network().parameters())
    ptr = copy_param.data_ptr()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9)
    after, _ = eng.sample(z, nfe=3)
    fresh, _ = SamplingEngine(model, device="cpu", dtype="bf16").sample(z, nfe=3)
    assert not torch.equal(before, after) and torch.equal(after, fresh)
    assert copy_param.data_ptr() == ptr and eng.stats["weight_refreshes"] == 1  # same addresses


# --------------------------------------------------------------------------- NVTX ranges

def test_nvtx_ranges_eager(monkeypatch):
    """Eager runs emit sample > step > (network > head, update); the profiling calls are no-ops
    without a profiler and nest correctly."""
    from genie_fast import profiling

    events = []
    monkeypatch.setattr(engine_mod, "push", lambda name: (events.append(("push", name)), profiling.push(name)))
    monkeypatch.setattr(engine_mod, "pop", lambda: (events.append(("pop", None)), profiling.pop()))

    real = profiling.nvtx_range

    def recording_range(name):
        events.append(("push", name))
        cm = real(name)

        class _Rec:
            def __enter__(self):
                return cm.__enter__()

            def __exit__(self, *exc):
                events.append(("pop", None))
                return cm.__exit__(*exc)
        return _Rec()

    monkeypatch.setattr(engine_mod, "nvtx_range", recording_range)
    model = random_model()
    SamplingEngine(model, device="cpu").sample(noise_for(model, batch=2), solver="genie", nfe=4,
                                               afs=True, denoise=True)
    names = [n for kind, n in events if kind == "push"]
    assert names.count("sample") == 1 and names.count("step") == 5       # 4 steps + denoising
    assert names.count("network") == 4 and names.count("head") == 3     # AFS step: no network
    assert names.count("update") == 5
    depth = 0
    for kind, _ in events:
        depth += 1 if kind == "push" else -1
        assert depth >= 0
    assert depth == 0
    assert all(not h for h in (model.head._forward_hooks, model.head._forward_pre_hooks))


def test_profiling_noop_cost():
    import time

    from genie_fast import profiling

    t0 = time.perf_counter()
    for _ in range(10000):
        with profiling.nvtx_range("step"):
            pass
    per_pair_us = (time.perf_counter() - t0) / 10000 * 1e6
    assert per_pair_us < 50, per_pair_us  # microseconds, against milliseconds per network call


# --------------------------------------------------------------------------- cache logic (no GPU)

class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on the CPU: replay reruns the captured loop."""

    def __init__(self, fn):
        self.fn, self.replays = fn, 0

    def replay(self):
        self.replays += 1
        self.fn()


def _fake_capture(self, net, key, prog, x_T):
    x_in = x_T.clone()
    out = torch.empty_like(x_in)
    graph = _FakeGraph(lambda: out.copy_(self._loop(net, x_in, key, prog, stages=False)))
    return _Entry(graph=graph, x_in=x_in, out=out, tables=(prog.rows, prog.t_net), capture_s=0.0)


def test_lru_cache_recaptures_on_key_change(monkeypatch):
    monkeypatch.setattr(SamplingEngine, "_capture", _fake_capture)
    model = random_model()
    eng = SamplingEngine(model, device="cpu", max_graphs=2)
    eng.use_graphs = True  # the capture is faked, the cache logic is real
    z2, z3 = noise_for(model, batch=2), noise_for(model, batch=3)
    eager = SamplingEngine(model, device="cpu")

    a, _ = eng.sample(z2, nfe=3)
    assert torch.equal(a, eager.sample(z2, nfe=3)[0])
    z2b = draw_noise(2, (1, 8, 8), seed=5)
    b, _ = eng.sample(z2b, nfe=3)  # same key: replay with new noise, no capture
    assert eng.stats["captures"] == 1 and torch.equal(b, eager.sample(z2b, nfe=3)[0])
    c, _ = eng.sample(z3, nfe=3)   # batch changed: a new graph
    d, _ = eng.sample(z2, nfe=4)   # NFE changed: a new graph, the oldest (batch 2, nfe 3) goes
    assert eng.stats["captures"] == 3 and eng.stats["evictions"] == 1 and len(eng._graphs) == 2
    assert torch.equal(d, eager.sample(z2, nfe=4)[0]) and torch.equal(c, eager.sample(z3, nfe=3)[0])
    e, _ = eng.sample(z2, nfe=3)   # evicted key: captured again, never stale
    assert eng.stats["captures"] == 4 and torch.equal(e, a)
    assert eng.cache_info()["graphs"] == 2
    # output buffers are copies: a later replay does not change what an earlier call returned
    e_copy = e.clone()
    eng.sample(z2b, nfe=3)
    assert torch.equal(e, e_copy)


def test_capture_failure_falls_back_once(monkeypatch):
    def failing_capture(self, net, key, prog, x_T):
        raise engine_mod._Uncapturable("capture failed: operation not permitted when stream is capturing")

    monkeypatch.setattr(SamplingEngine, "_capture", failing_capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    model = random_model()
    eng = SamplingEngine(model, device="cpu")
    eng.use_graphs = True
    z = noise_for(model, batch=2)
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        x, _ = eng.sample(z, nfe=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, _ = eng.sample(z, nfe=3)
        eng.sample(z, nfe=4)  # another key fails too, but the warning was said once
    assert torch.equal(x, y) and torch.equal(x, SamplingEngine(model, device="cpu").sample(z, nfe=3)[0])
    assert eng.stats["capture_failures"] == 2 and eng.stats["eager_runs"] == 3


def test_default_model_engine_matches_reference():
    """The shipped model, when present: the eager engine equals the reference solver."""
    try:
        from genie_fast.models import load_default

        model = load_default()
    except Exception as e:  # absent until the model issue ships its weights
        pytest.skip(f"default model not available: {e}")
    shape = getattr(model, "image_shape", None) or engine_mod._image_shape(model)
    z = draw_noise(2, shape, seed=3)
    x0, nfe = SamplingEngine(model, device="cpu").sample(z, solver="genie", nfe=4)
    with torch.no_grad():
        ref, _ = SOLVERS["genie"](model.eval(), z, time_grid(model.schedule, 4), model.schedule)
    assert nfe == 4 and torch.equal(x0, ref)


# --------------------------------------------------------------------------- CUDA

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


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_cuda_graph_replay_equals_eager(solver, no_tf32):
    """The captured graph runs the same kernels as the eager loop: with fp32 (TF32 off) the results
    agree to a few float32 ulps; a stale or wrong buffer would differ by O(1)."""
    model = random_model("fmnist_small")
    z = noise_for(model, batch=4).cuda()
    graph_eng = SamplingEngine(model, device="cuda", dtype="fp32")
    eager_eng = SamplingEngine(model, device="cuda", dtype="fp32", use_graphs=False)
    g1, _ = graph_eng.sample(z, solver=solver, nfe=6)
    z2 = draw_noise(4, (1, 32, 32), seed=11).cuda()
    g2, _ = graph_eng.sample(z2, solver=solver, nfe=6)  # replay with new noise
    e1, _ = eager_eng.sample(z, solver=solver, nfe=6)
    e2, _ = eager_eng.sample(z2, solver=solver, nfe=6)
    assert graph_eng.stats["captures"] == 1 and graph_eng.stats["replays"] == 2
    assert rel_err(g1, e1) < 1e-5 and rel_err(g2, e2) < 1e-5, (rel_err(g1, e1), rel_err(g2, e2))
    # fp16: the same kernels in graph and eager, so the graph adds nothing to fp16's own error
    h_graph, _ = SamplingEngine(model, device="cuda").sample(z, solver=solver, nfe=6)
    h_eager, _ = SamplingEngine(model, device="cuda", use_graphs=False).sample(z, solver=solver, nfe=6)
    assert rel_err(h_graph, h_eager) < 0.1 * FP16_REL_BOUND


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_cuda_fp16_graph_vs_fp32_eager(solver, no_tf32):
    model = random_model("fmnist_small")
    z = noise_for(model, batch=8).cuda()
    ref, _ = SamplingEngine(model, device="cuda", dtype="fp32", use_graphs=False).sample(z, solver=solver, nfe=10)
    x16, _ = SamplingEngine(model, device="cuda", dtype="fp16").sample(z, solver=solver, nfe=10)
    xbf, _ = SamplingEngine(model, device="cuda", dtype="bf16").sample(z, solver=solver, nfe=10)
    assert 0 < rel_err(x16, ref) < FP16_REL_BOUND, rel_err(x16, ref)
    assert 0 < rel_err(xbf, ref) < BF16_REL_BOUND, rel_err(xbf, ref)


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
    assert rel_err(a2, eager.sample(z2, nfe=4)[0]) < 0.1 * FP16_REL_BOUND
    with torch.no_grad():                       # in-place weight change: graphs stay, values refresh
        for p in model.parameters():
            p.mul_(0.9)
    b, _ = eng.sample(z2, nfe=4)
    assert eng.stats["captures"] == 4 and not torch.equal(a2, b)
    assert rel_err(b, eager.sample(z2, nfe=4)[0]) < 0.1 * FP16_REL_BOUND
    out1, _ = eng.sample(z2, nfe=4)
    keep = out1.clone()
    eng.sample(z3, nfe=4)
    assert torch.equal(out1, keep)              # returned tensors are not the static buffer


@pytest.mark.cuda
@needs_cuda
def test_cuda_eager_loop_has_no_host_sync():
    model = random_model("tiny")
    eng = SamplingEngine(model, device="cuda", use_graphs=False)
    z = noise_for(model, batch=2).cuda()
    eng.sample(z, nfe=4)  # first call: copies weights, builds tables
    key = eng.key(z, nfe=4)
    prog = engine_mod._Program(key, eng.device)
    net = eng.network()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            eng._loop(net, z, key, prog, stages=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


class _Syncing(nn.Module):
    """An eps model that reads a device value on the host: it cannot be captured."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))

    def forward(self, x, t):
        scale = float(self.w.abs().max())  # host sync: refused during capture
        return scale * x


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
    x2, _ = eng.sample(z, solver="ddim", nfe=3)  # now known: eager without a new capture attempt
    assert torch.equal(x2, y) and eng.stats["capture_failures"] == 1


@pytest.mark.cuda
@needs_cuda
def test_cuda_groupnorm_fp16_statistics():
    x = (100 + torch.randn(4, 32, 8, 8, device="cuda")).half()
    gn = nn.GroupNorm(8, 32, eps=1e-6).cuda()
    ref = gn(x.float())
    out = gn.half()(x).float()
    assert (out - ref).abs().max() < 4 * 2.0 ** -11 * ref.abs().max()


@pytest.mark.cuda
@needs_cuda
def test_cuda_public_sample_uses_engine():
    import genie_fast

    model = random_model("tiny")
    z = noise_for(model, batch=2)
    x_gpu, nfe = genie_fast.sample(model, noise=z, solver="genie", nfe=4, device="cuda")
    x_cpu, _ = genie_fast.sample(model, noise=z, solver="genie", nfe=4)
    eng = engine_mod.engine_for(model, torch.device("cuda", torch.cuda.current_device()))
    assert eng.stats["captures"] == 1 and eng.stats["replays"] == 1 and nfe == 4
    assert x_gpu.is_cuda and rel_err(x_gpu.cpu(), x_cpu) < FP16_REL_BOUND


def test_capture_code_path_with_stand_in_cuda(monkeypatch):
    """Runs the real `_capture` (side-stream warm-up, sync-checked last warm-up, capture into the
    shared pool) on the CPU with torch.cuda's graph API replaced by stand-ins that record the calls.
    The stand-in graph cannot replay, so only the first call's result (computed during 'capture')
    is compared; the GPU tests check replays."""
    import contextlib

    calls = []

    class Graph:
        def replay(self):
            calls.append("replay")

    @contextlib.contextmanager
    def graph(g, pool=None, stream=None, **kw):
        calls.append(("capture", pool, stream))
        yield

    @contextlib.contextmanager
    def stream_ctx(s):
        calls.append(("stream", s))
        yield

    class Stream:
        def __init__(self, device=None):
            calls.append("new_stream")

        def wait_stream(self, other):
            calls.append("wait_stream")

    modes = []
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: ("pool", 1))
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", stream_ctx)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: modes.append(mode))

    model = random_model()
    eng = SamplingEngine(model, device="cpu", warmup=2)
    eng.use_graphs = True
    z = noise_for(model, batch=2)
    x, nfe = eng.sample(z, solver="genie", nfe=4)
    ref, _ = SamplingEngine(model, device="cpu").sample(z, solver="genie", nfe=4)
    assert torch.equal(x, ref) and nfe == 4
    assert modes == ["error", 0]                      # the last warm-up run is sync-checked, then restored
    captures = [c for c in calls if isinstance(c, tuple) and c[0] == "capture"]
    assert len(captures) == 1 and captures[0][1] == ("pool", 1) and calls.count("replay") == 1
    eng.sample(z, solver="genie", nfe=5)             # a second key: same pool and side stream
    captures = [c for c in calls if isinstance(c, tuple) and c[0] == "capture"]
    assert len(captures) == 2 and captures[1][1:] == captures[0][1:] and calls.count("new_stream") >= 1
    assert eng.stats["captures"] == 2 and len(eng._graphs) == 2
