"""The CPU path (issue 30): a bf16 network where the CPU has bf16 natively (detected; float32 with a
one-line notice elsewhere; float16 refused), around a float32 state; channels-last copies of the
network; the network compiled by torch.compile (the compile tests are `slow`)."""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

from genie_fast import devices
from genie_fast.devices import CPU_BF16_ENV, cpu_bf16_native
from genie_fast.engine import SamplingEngine
from genie_fast.models.head import GenieModel
from genie_fast.models.unet import CONFIGS, UNet
from genie_fast.precision import half_bounds
from genie_fast.solvers import AUTO_GRID, DEFAULT_SOLVER, SOLVERS
from genie_fast.weights import CompiledNet
from test_engine import noise_for, random_model, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")

NATIVE_BF16 = devices._detect_cpu_bf16()
needs_native_bf16 = pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16 (avx512_bf16 / amx_bf16 "
                                                               "/ aarch64 bf16); CI may run on another CPU")


@pytest.fixture
def fresh_notices(monkeypatch):
    monkeypatch.setattr(devices, "_notices", set())


def _conv_weights(net):
    return [m.weight for m in net.modules() if isinstance(m, nn.Conv2d)]


def _layout_matters(w):  # a 1x1 kernel or one input channel is the same memory either way
    return w.shape[1] > 1 and w.shape[2] * w.shape[3] > 1


# --------------------------------------------------------------------------- bf16 detection and resolution

def test_bf16_detection_reads_the_cpu_flags(tmp_path, monkeypatch):
    files = {"epyc": "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw\n",
             "sapphire": "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n",
             "neoverse": "processor\t: 0\nFeatures\t: fp asimd sve sve2 bf16 i8mm\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    no_probes = ()
    assert not devices._detect_cpu_bf16(str(tmp_path / "epyc"), no_probes)  # AVX-512 alone is not bf16
    assert devices._detect_cpu_bf16(str(tmp_path / "sapphire"), no_probes)
    assert devices._detect_cpu_bf16(str(tmp_path / "neoverse"), no_probes)
    assert not devices._detect_cpu_bf16(str(tmp_path / "absent"), no_probes)
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert cpu_bf16_native()
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert not cpu_bf16_native()
    monkeypatch.setenv(CPU_BF16_ENV, "yes")  # not an override: detected
    assert cpu_bf16_native() == NATIVE_BF16


def test_bf16_without_native_support_runs_float32_with_one_notice(monkeypatch, fresh_notices):
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    model = random_model()
    z = noise_for(model, batch=2)
    eng = SamplingEngine(model, device="cpu")
    ref, _ = eng.sample(z, solver="ddim", nfe=4)
    with pytest.warns(UserWarning, match="no native bf16.*float32") as rec:
        x, _ = eng.sample(z, solver="ddim", nfe=4, net_dtype="bf16")
    notices = [w for w in rec if "bf16" in str(w.message)]
    assert len(notices) == 1 and "\n" not in str(notices[0].message)
    assert torch.equal(x, ref)  # the float32 network, the same key
    assert eng.key(z, solver="ddim", nfe=4, net_dtype=torch.bfloat16) == eng.key(z, solver="ddim", nfe=4)
    with warnings.catch_warnings():  # once per process
        warnings.simplefilter("error")
        SamplingEngine(model, device="cpu", net_dtype="bfloat16").sample(z, solver="ddim", nfe=4)
    for fp16 in ("fp16", torch.float16):
        with pytest.raises(ValueError, match="float16 network on the CPU is refused"):
            SamplingEngine(model, device="cpu", net_dtype=fp16)
        with pytest.raises(ValueError, match="float16 network on the CPU is refused"):
            eng.sample(z, solver="ddim", nfe=4, net_dtype=fp16)


@pytest.mark.parametrize("solver", ["ddim", "genie", "genie_multistep"])
def test_bf16_network_around_a_float32_state(solver, monkeypatch, fresh_notices):
    """bf16 as the engine runs it on a bf16 CPU (forced here: emulated where the CPU has no bf16, the
    same roundings, only slower): a bf16 copy of the network (channels-last), the user's model left
    in float32, float32 samples within the one table's bf16 bound of the float32 network's."""
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    model = random_model()
    z = noise_for(model, batch=4)
    eng = SamplingEngine(model, device="cpu")
    ref, _ = eng.sample(z, solver=solver, nfe=10)
    x, _ = eng.sample(z, solver=solver, nfe=10, net_dtype="bf16")
    assert x.dtype == torch.float32 and eng.key(z, solver=solver, nfe=10, net_dtype="bf16").net_dtype == torch.bfloat16
    net = eng.network(torch.bfloat16)
    assert net is not model and {p.dtype for p in net.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(net))
    assert 0 < rel_err(x, ref) < half_bounds(solver)[1], rel_err(x, ref)
    with pytest.raises(ValueError, match="float64 state needs a float64 network"):
        eng.sample(z, solver=solver, nfe=10, dtype=torch.float64, net_dtype="bf16")


@needs_native_bf16
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_native_bf16_agrees_with_float32_per_solver(solver, monkeypatch):
    """On a CPU with native bf16 (detected, no override): every solver within its bf16 bound of
    genie_fast.precision (random-weight U-Net, NFE 10, batch 4, the table's setting)."""
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    model = random_model()
    z = noise_for(model, batch=4)
    eng = SamplingEngine(model, device="cpu")
    ref, _ = eng.sample(z, solver=solver, nfe=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no notice: the CPU has it
        x, _ = eng.sample(z, solver=solver, nfe=10, net_dtype="bf16")
    assert eng.key(z, solver=solver, nfe=10, net_dtype="bf16").net_dtype == torch.bfloat16
    assert 0 < rel_err(x, ref) < half_bounds(solver)[1], rel_err(x, ref)


# --------------------------------------------------------------------------- channels-last

def test_channels_last_copies_leave_the_model_alone():
    model = random_model()
    z = noise_for(model, batch=2)
    ptrs = [p.data_ptr() for p in model.parameters()]
    plain = SamplingEngine(model, device="cpu", channels_last=False)
    auto = SamplingEngine(model, device="cpu")
    cl = SamplingEngine(model, device="cpu", channels_last=True)
    assert plain.network(torch.float32) is model and auto.network(torch.float32) is model  # as is, read live
    net = cl.network(torch.float32)
    weights = [w for w in _conv_weights(net) if _layout_matters(w)]
    assert net is not model and weights
    assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in weights)
    assert all(p.is_contiguous() for p in model.parameters()) and [p.data_ptr() for p in model.parameters()] == ptrs
    for eng in (plain, auto):  # float64 copies (accuracy work) keep the layout unless asked
        assert eng.network(torch.float64) is not model
        assert all(w.is_contiguous() for w in _conv_weights(eng.network(torch.float64)))
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(cl.network(torch.float64)))
    model.double()  # a float32 copy of a float64 model: channels-last
    fresh = SamplingEngine(model, device="cpu").network(torch.float32)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(fresh))
    model.float()
    for solver in ("genie", "dpmpp_2m"):
        ref, _ = plain.sample(z, solver=solver, nfe=6)
        x, _ = cl.sample(z, solver=solver, nfe=6)
        assert rel_err(x, ref) < 1e-5, (solver, rel_err(x, ref))
    first = _conv_weights(model)[1]
    with torch.no_grad():
        first.mul_(1.5)  # in place: reaches the channels-last copy before the next call
    ref2, _ = plain.sample(z, solver="genie", nfe=6)
    x2, _ = cl.sample(z, solver="genie", nfe=6)
    assert rel_err(ref2, ref) > 1e-3 and rel_err(x2, ref2) < 1e-5


def test_loaded_float32_models_are_channels_last_and_the_same_model():
    """load_model / load_default on the CPU in float32: 4-D weights in channels-last order (oneDNN's fast
    layout), run as is by the engine (no copy), the same weights id (tuned grids still apply) and samples
    within 1e-5 of the stored NCHW layout, on a fixed grid (a layout check: independent of the tuned
    grids the model ships); float64 keeps the stored layout (accuracy work)."""
    from genie_fast.grid_store import model_weights_id
    from genie_fast.models.default import load_default

    model = load_default()
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not all(p.is_contiguous() for p in convs)  # the stored (NCHW) layout differs for some
    nchw = load_default().to(memory_format=torch.contiguous_format)
    assert all(p.is_contiguous() for p in nchw.parameters())
    assert model_weights_id(model) == model_weights_id(nchw)
    engine = SamplingEngine(model, device="cpu")
    z = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    grid = AUTO_GRID[DEFAULT_SOLVER]
    x, _ = engine.sample(z, nfe=5, grid=grid)
    assert engine._weights.nets[torch.float32] is model  # as is: read live
    x_ref, _ = SamplingEngine(nchw, device="cpu", channels_last=False).sample(z, nfe=5, grid=grid)
    assert x.is_contiguous() and rel_err(x, x_ref) < 1e-5
    f64 = load_default(dtype=torch.float64)
    assert all(p.is_contiguous() for p in f64.parameters())


def test_channels_last_with_several_channels():
    """eps of a 3-channel network comes back channels-last; the step ops read it as such."""
    torch.manual_seed(0)
    model = GenieModel(UNet(dataclasses.replace(CONFIGS["tiny"], in_channels=3))).eval()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.reset_parameters()
    z = torch.randn(2, 3, 8, 8)
    plain = SamplingEngine(model, device="cpu", channels_last=False)
    cl = SamplingEngine(model, device="cpu", channels_last=True)
    eps = cl.network(torch.float32)(z, torch.full((2,), 0.5))
    assert eps.is_contiguous(memory_format=torch.channels_last) and not eps.is_contiguous()
    for solver in ("genie", "ddim", "unipc"):
        ref, _ = plain.sample(z, solver=solver, nfe=6)
        x, _ = cl.sample(z, solver=solver, nfe=6)
        assert x.is_contiguous() and rel_err(x, ref) < 1e-5, (solver, rel_err(x, ref))


# --------------------------------------------------------------------------- compile

def test_compiled_net_is_the_net_outside_its_compiled_calls():
    model = random_model()
    wrapped = CompiledNet(model)
    assert wrapped.head is None  # no NVTX hooks on a compiled head (they would recompile every call)
    assert wrapped.image_shape == model.image_shape and wrapped.schedule is model.schedule
    assert callable(wrapped.eps_and_head) and not hasattr(CompiledNet(nn.Conv2d(1, 1, 1)), "eps_and_head")
    x = noise_for(model, batch=2)
    t = torch.full((2,), 0.5)
    with torch.enable_grad():  # autograd on: the eager net, nothing compiled
        assert torch.equal(wrapped(x, t), model(x, t))
        eps, head = wrapped.eps_and_head(x, t)
        assert torch.equal(head, model.eps_and_head(x, t)[1])
    assert wrapped.compiles == 0 and not wrapped._compiled
    with pytest.raises(TypeError, match="compile must be True or False"):
        SamplingEngine(model, device="cpu", compile="yes")
    assert "compile_s" not in SamplingEngine(model, device="cpu").cache_info()


@pytest.mark.slow
def test_compiled_engine_matches_eager_and_compiles_once_per_shape():
    model = random_model()
    z = noise_for(model, batch=2)
    eager = SamplingEngine(model, device="cpu")
    comp = SamplingEngine(model, device="cpu", compile=True)
    for solver in ("ddim", "genie"):  # forward, then eps_and_head
        ref, _ = eager.sample(z, solver=solver, nfe=4)
        x, _ = comp.sample(z, solver=solver, nfe=4)
        assert rel_err(x, ref) < 1e-4, (solver, rel_err(x, ref))
    info = comp.cache_info()
    assert info["compiles"] == 2 and info["compile_s"] > 0
    comp.sample(z, solver="dpmpp_2m", nfe=8)
    assert comp.cache_info()["compiles"] == 2  # kept within the process
    ref, _ = eager.sample(z, solver="genie_exact", steps=2, afs=False)  # the JVP runs the eager net
    x, _ = comp.sample(z, solver="genie_exact", steps=2, afs=False)
    assert rel_err(x, ref) < 1e-4
    with torch.no_grad():
        _conv_weights(model)[1].mul_(1.5)  # in place: the compiled graph reads the changed weights
    ref, _ = eager.sample(z, solver="ddim", nfe=4)
    x, _ = comp.sample(z, solver="ddim", nfe=4)
    assert rel_err(x, ref) < 1e-4 and comp.cache_info()["compiles"] == 2


def test_generate_compile_flag():
    from genie_fast.generate import build_parser

    assert build_parser().parse_args(["--outdir", "o", "--seeds", "0-3", "--compile"]).compile is True
    assert build_parser().parse_args(["--outdir", "o", "--seeds", "0-3"]).compile is False


@pytest.mark.slow
def test_generate_with_a_compiled_network(tmp_path, capsys):
    """generate --compile: the same images (within one 8-bit level) and its compile time on stderr."""
    import numpy as np

    from genie_fast.generate import generate

    model = random_model()
    out = {}
    for compiled in (False, True):
        generate(model, list(range(6)), tmp_path / str(compiled), model_info={"kind": "test"}, batch=3,
                 solver="ddim", nfe=4, device="cpu", progress=False, compile=compiled)
        out[compiled] = np.load(tmp_path / str(compiled) / "samples.npz")["arr_0"].astype(int)
    assert np.abs(out[True] - out[False]).max() <= 1
    assert "compiled the network in" in capsys.readouterr().err
