"""diffusers UNet2DModel adapter: schedules, parity with diffusers' own schedulers, JVPs through
its attention, the GENIE head (hooks, distillation CLI, resume, save/load). Nothing is fetched
from a hub: the UNets are small random ones written with save_pretrained and loaded back."""
import copy
import json
import math

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import genie_fast  # noqa: E402
from genie_fast.cli import main  # noqa: E402
from genie_fast.models.diffusers import (DiffusersSchedule, DiffusersUNet, from_diffusers, load_diffusers,  # noqa: E402
                                         load_head, save_head, scheduler_grid)
from genie_fast.models.head import GenieHead, HeadConfig  # noqa: E402
from genie_fast.solvers import SOLVERS, jvp  # noqa: E402

U32 = 2.0 ** -24  # float32 unit round-off


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_unet(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
               down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
               norm_num_groups=8, attention_head_dim=8)
    cfg.update(kw)
    return diffusers.UNet2DModel(**cfg).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A pipeline folder (unet/ + scheduler/) written with save_pretrained."""
    root = tmp_path_factory.mktemp("tiny_diffusers")
    _tiny_unet().save_pretrained(root / "unet")
    diffusers.DDPMScheduler(beta_schedule="linear").save_pretrained(root / "scheduler")
    return root


@pytest.fixture(scope="module")
def unet(model_dir):
    return diffusers.UNet2DModel.from_pretrained(model_dir, subfolder="unet", local_files_only=True).eval()


def _noise(b=3, shape=(1, 8, 8), seed=1):
    return torch.randn(b, *shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- schedule

@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_schedule_is_the_schedulers_alpha_bar(kind):
    sched = diffusers.DDIMScheduler(beta_schedule=kind)
    for s in (DiffusersSchedule.from_config(sched), DiffusersSchedule.from_config(dict(sched.config))):
        k = torch.arange(1000)
        t = s.time_of_step(k)
        torch.testing.assert_close(t, (k.double() + 1.0) / 1000, rtol=0, atol=0)
        torch.testing.assert_close(s.step_of_time(t), k.double(), rtol=0, atol=1e-12)
        ac = sched.alphas_cumprod.double()
        torch.testing.assert_close(s.alpha(t) ** 2, ac, rtol=1e-14, atol=0)
        torch.testing.assert_close(s.gamma(t), torch.sqrt((1 - ac) / ac), rtol=1e-12, atol=0)
        assert s.model_time(0.5) == 0.5 and s.t_end == 1e-3


def test_trained_betas_and_refusals(unet):
    betas = torch.linspace(1e-4, 0.02, 1000).tolist()
    s = DiffusersSchedule.from_config({"trained_betas": betas, "num_train_timesteps": 1000})
    ref = diffusers.DDIMScheduler(trained_betas=betas).alphas_cumprod.double()
    torch.testing.assert_close(s.alpha(s.time_of_step(torch.arange(1000))) ** 2, ref, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="zero"):
        DiffusersSchedule.from_config({"rescale_betas_zero_snr": True})
    with pytest.raises(ValueError, match="beta_schedule"):
        DiffusersSchedule.from_config({"beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="prediction_type"):
        from_diffusers(unet, {"prediction_type": "sample"})
    with pytest.raises(TypeError, match="UNet2DModel"):
        from_diffusers(torch.nn.Conv2d(1, 1, 1), {})
    with pytest.raises(ValueError, match="positional"):
        from_diffusers(_tiny_unet(time_embedding_type="fourier"), {})


def test_scheduler_grid_refuses_loops_no_grid_matches():
    ddim = diffusers.DDIMScheduler(timestep_spacing="linspace")
    ddim.set_timesteps(10)  # 999, 888, ... but it steps 999 -> 899
    with pytest.raises(ValueError, match="next timestep"):
        scheduler_grid(ddim)
    dpm = diffusers.DPMSolverMultistepScheduler(final_sigmas_type="sigma_min")  # lower_order_final by default
    dpm.set_timesteps(10)
    with pytest.raises(ValueError, match="first order"):
        scheduler_grid(dpm)
    dpm = diffusers.DPMSolverMultistepScheduler(use_karras_sigmas=True)
    dpm.set_timesteps(10)
    with pytest.raises(ValueError, match="karras"):
        scheduler_grid(dpm)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler_grid(diffusers.DDIMScheduler())


# --------------------------------------------------------------------------- parity

def _diffusers_loop(unet, scheduler, x, **step_kw):
    with torch.no_grad():
        for k in scheduler.timesteps:
            x = scheduler.step(unet(x, k).sample, k, x, **step_kw).prev_sample
    return x


def _parity(unet, make_scheduler, solver, step_kw, steps=10, genie_fast_run=None):
    """(|diffusers32 - exact|, |genie_fast32 - exact|, scale, x_T): exact = genie_fast's float64
    solver on a float64 copy of the UNet (the same formula without round-off)."""
    x = _noise(shape=(1, 8, 8))
    sched = make_scheduler()
    sched.set_timesteps(steps)
    ref32 = _diffusers_loop(unet, sched, x.clone(), **step_kw)
    sched = make_scheduler()
    sched.set_timesteps(steps)
    if genie_fast_run is None:
        g = scheduler_grid(sched)
    run = genie_fast_run or (lambda m, noise: genie_fast.sample(m, noise=noise, solver=solver, nfe=None, **g)[0])
    got32 = run(from_diffusers(unet, sched), x)
    exact = run(from_diffusers(copy.deepcopy(unet).double(), sched), x.double())
    err = lambda a: float((a.double() - exact).abs().max())  # noqa: E731
    return err(ref32), err(got32), float(exact.abs().max()), x


def _assert_same_roundoff(e_diffusers, e_genie_fast, scale):
    """FlashAttention's rule both ways: each float32 loop within 2x the other's round-off (+ a floor
    of a few float32 ulps of the output scale), so neither hides a formula difference."""
    floor = 16 * U32 * scale
    assert e_genie_fast <= 2 * e_diffusers + floor, (e_genie_fast, e_diffusers, scale)
    assert e_diffusers <= 2 * e_genie_fast + floor, (e_genie_fast, e_diffusers, scale)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("spacing,offset,beta_schedule", [("leading", 0, "scaled_linear"), ("leading", 1, "linear"),
                                                         ("trailing", 0, "linear")])
def test_ddim_matches_diffusers_ddim_scheduler(unet, prediction_type, set_alpha_to_one, spacing, offset,
                                               beta_schedule):
    def make():
        return diffusers.DDIMScheduler(beta_schedule=beta_schedule, clip_sample=False, set_alpha_to_one=set_alpha_to_one,
                                       prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=offset)
    s = make()
    s.set_timesteps(10)
    g = scheduler_grid(s)
    # set_alpha_to_one ends on alpha = 1: genie_fast's final denoising step
    assert g["denoise"] == set_alpha_to_one
    e_d, e_g, scale, _ = _parity(unet, make, "ddim", {"eta": 0.0})
    _assert_same_roundoff(e_d, e_g, scale)


def test_scheduler_timesteps_as_grid_reproduce_the_ddim_loop_with_the_default_afs(unet):
    """Issue 29: a user who passes the scheduler's timesteps as grid= (the guide's recipe, section 6)
    and leaves afs at its default gets DDIMScheduler's result: an explicit grid turns AFS off by
    default (it used to be on, and the result landed ~40% away). AFS stays on for named grids, and
    afs=True still applies it to a given grid."""
    def make():  # set_alpha_to_one=False, leading spacing: the timesteps alone are the whole grid
        return diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False, set_alpha_to_one=False)
    sched = make()
    sched.set_timesteps(10)
    model = from_diffusers(unet, sched)
    grid = model.schedule.time_of_step(sched.timesteps)
    x = _noise(b=1)
    ref = _diffusers_loop(unet, sched, x.clone(), eta=0.0)
    got, nfe = genie_fast.sample(model, noise=x, solver="ddim", grid=grid)
    assert nfe == len(grid) - 1  # every step calls the network, the first one too
    via_options, _ = genie_fast.sample(model, noise=x, solver="ddim", **scheduler_grid(sched))
    torch.testing.assert_close(got, via_options, rtol=0, atol=0)
    exact, _ = genie_fast.sample(from_diffusers(copy.deepcopy(unet).double(), sched), noise=x.double(), solver="ddim",
                                 grid=grid)
    err = lambda a: float((a.double() - exact).abs().max())  # noqa: E731
    _assert_same_roundoff(err(ref), err(got), float(exact.abs().max()))
    with_afs, nfe_afs = genie_fast.sample(model, noise=x, solver="ddim", grid=grid, afs=True)
    assert nfe_afs == nfe - 1
    assert float((with_afs - ref).norm() / ref.norm()) > 0.1  # what the old default gave: far off
    from genie_fast.solvers import resolve
    assert resolve("ddim", nfe=10).afs and not resolve("ddim", grid=grid.tolist()).afs
    assert resolve("ddim", grid=grid.tolist(), afs=True).afs and resolve("ddim", grid="edm").afs


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("final,lower_order_final,steps", [("zero", True, 10), ("zero", False, 16),
                                                           ("sigma_min", False, 10)])
def test_dpmpp_2m_matches_diffusers_dpm_solver_multistep(unet, prediction_type, final, lower_order_final, steps):
    def make():
        return diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                                     prediction_type=prediction_type, final_sigmas_type=final,
                                                     lower_order_final=lower_order_final)
    e_d, e_g, scale, _ = _parity(unet, make, "dpmpp_2m", {}, steps=steps)
    _assert_same_roundoff(e_d, e_g, scale)


def test_dpm_lower_order_final_is_a_ddim_last_step(unet):
    """final_sigmas_type='sigma_min' with lower_order_final (below 15 steps): diffusers' last step is
    first order; dpmpp_2m over the other steps followed by one ddim step reproduces it."""
    def make():
        return diffusers.DPMSolverMultistepScheduler(final_sigmas_type="sigma_min", lower_order_final=True)

    s = make()
    s.set_timesteps(10)
    ts = DiffusersSchedule.from_config(s).time_of_step(s.timesteps).tolist() + [1e-3]

    def run(model, x):  # noqa: F811
        x = genie_fast.sample(model, noise=x, solver="dpmpp_2m", nfe=None, grid=ts[:-1], afs=False)[0]
        return genie_fast.sample(model, noise=x, solver="ddim", nfe=None, grid=ts[-2:], afs=False)[0]
    e_d, e_g, scale, _ = _parity(unet, make, None, {}, genie_fast_run=run)
    _assert_same_roundoff(e_d, e_g, scale)


def test_v_prediction_at_huge_gamma_is_float32_conditioning(unet):
    """squaredcos_cap_v2 from t = 1 (trailing spacing) starts at gamma = 2e4. genie_fast forms
    eps = alpha v + sigma x in float32, where alpha v ~ 5e-5 |v| sits beside sigma x ~ |x|, and
    x0 = x_bar - gamma eps keeps that round-off times gamma; diffusers forms x0 = alpha x - sigma v
    directly. The difference is bounded by u * gamma_0 * |x_T| (u: float32 unit round-off)."""
    def make():
        return diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False,
                                       timestep_spacing="trailing", prediction_type="v_prediction")
    e_d, e_g, scale, x = _parity(unet, make, "ddim", {"eta": 0.0})
    gamma0 = float(DiffusersSchedule.from_config(make()).gamma(1.0))
    assert gamma0 > 1e4
    assert e_d <= 32 * U32 * scale          # diffusers' own loop: plain round-off
    assert e_g <= U32 * gamma0 * float(x.abs().max()), (e_g, U32 * gamma0 * float(x.abs().max()))


# --------------------------------------------------------------------------- the model

def test_adapter_calls_the_unet_at_its_timestep(unet):
    model = from_diffusers(unet, {"beta_schedule": "linear"})
    assert isinstance(model, DiffusersUNet) and model.image_shape == (1, 8, 8) and model.num_classes == 0
    assert not callable(getattr(model, "eps_and_head", None))
    x = _noise()
    t = torch.tensor([0.9, 0.5, 0.001])
    with torch.no_grad():
        want = unet(x, torch.tensor([899.0, 499.0, 0.0])).sample
        torch.testing.assert_close(model(x, t), want, rtol=0, atol=0)
        eps, feats, temb = model(x, t, return_features=True)
        assert feats.shape == (3, 16, 8, 8) and temb.shape == (3, 64)
        torch.testing.assert_close(eps, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="labels"):
        model(x, t, labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="eps_and_head"):
        genie_fast.sample(model, noise=x, solver="genie", nfe=4)
    # the feature hooks live for one call: the user's UNet is left as it was
    assert not unet.conv_norm_out._forward_pre_hooks and not unet.time_embedding._forward_hooks


def test_engine_copy_keeps_the_float64_table(unet):
    """The engine's copy in another dtype (engine._converted_copy: what a GPU engine runs in fp16)
    converts as .half() / .to(dtype) do, through the adapter's own _apply: its float64 log-alpha
    table stays float64 (in fp16, tau ~ 999 would round to steps of 0.5 and alpha with it); the
    UNet's weights are converted; the user's model is untouched."""
    from genie_fast.engine import _converted_copy

    model = from_diffusers(copy.deepcopy(unet), {"beta_schedule": "linear", "prediction_type": "v_prediction"})
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    x, t = _noise(), torch.tensor([0.9, 0.5, 0.02])
    with torch.no_grad():
        ref = model(x, t)
        for dt in (torch.float16, torch.bfloat16, torch.float64):
            low = _converted_copy(model, "cpu", dt)
            assert low.log_alpha_table.dtype == torch.float64
            assert torch.equal(low.log_alpha_table, model.log_alpha_table)
            assert {p.dtype for p in low.unet.parameters()} == {dt}
            assert not any(p.requires_grad for p in low.parameters())
            if dt != torch.float16:  # (fp16 convolutions on the CPU are slow; bf16 shows the same)
                err = float((low(x.to(dt), t).double() - ref.double()).norm() / ref.double().norm())
                assert err < (1e-2 if dt == torch.bfloat16 else 1e-6), (dt, err)
    assert all(torch.equal(v, weights[k]) and v.dtype == weights[k].dtype for k, v in model.state_dict().items())
    assert next(model.unet.parameters()).dtype == torch.float32 and model.log_alpha_table.dtype == torch.float64


def test_float32_times_land_on_the_steps():
    """0.9 in float32 is 0.89999998: the adapter still calls the network at timestep 899 exactly
    (a time between steps is left alone), and the derivative in t stays N (the snap is detached)."""
    calls = []

    class Probe(diffusers.UNet2DModel):
        def forward(self, sample, timestep, **kw):
            calls.append(timestep.detach().clone())
            return super().forward(sample, timestep, **kw)

    probe = Probe.from_config(_tiny_unet().config).eval()
    model = from_diffusers(probe, {"beta_schedule": "linear"})
    with torch.no_grad():
        model(_noise(b=3), torch.tensor([0.9, 0.3, 0.5005], dtype=torch.float32))
    assert calls[-1][:2].tolist() == [899.0, 299.0]
    assert calls[-1][2].item() == pytest.approx(499.5, abs=1e-4) and calls[-1][2].item() != 499.5
    t = torch.tensor([0.9], requires_grad=True)
    model._timestep(t).sum().backward()
    assert float(t.grad) == pytest.approx(1000.0)


def test_jvp_through_attention_and_groupnorm(unet):
    """Forward-mode JVPs (solvers.jvp) through the adapter and the UNet's attention blocks: the x
    part against float64 central differences, the whole tangent (t through the adapter's
    tau = N t - 1 and the v_prediction conversion) against reverse-over-reverse."""
    model = from_diffusers(copy.deepcopy(unet).double(), {"beta_schedule": "linear", "prediction_type": "v_prediction"})
    x = _noise().double()
    t = torch.tensor([0.95, 0.5, 0.02], dtype=torch.float64)
    dx = _noise(seed=2).double()
    with torch.no_grad():
        _, d_x = jvp(model, (x, t), (dx, torch.zeros_like(t)))
        h = 1e-5
        fd = (model(x + h * dx, t) - model(x - h * dx, t)) / (2 * h)
    assert float((d_x - fd).abs().max()) <= 1e-7 * float(fd.abs().max())
    dt = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    with torch.no_grad():
        _, d_full = jvp(model, (x, t), (dx, dt))
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.MATH]):
        _, d_ref = torch.autograd.functional.jvp(model, (x, t), (dx, dt))
    torch.testing.assert_close(d_full, d_ref, rtol=1e-10, atol=1e-10)


def test_every_solver_samples_the_adapter(model_dir, tmp_path):
    net = load_diffusers(model_dir, head=None)
    head = GenieHead(HeadConfig.for_unet(net))
    torch.nn.init.normal_(head.conv_out.weight, std=0.01)
    save_head(head, tmp_path / "h")
    model = load_diffusers(model_dir, head=tmp_path / "h")
    x = _noise()
    for solver in SOLVERS:
        x0, nfe = genie_fast.sample(model, noise=x, solver=solver, nfe=8, grid="logsnr")
        assert x0.shape == x.shape and bool(torch.isfinite(x0).all()) and 0 < nfe <= 8, solver


def test_class_conditional_unet_with_guidance(tmp_path):
    unet = _tiny_unet(seed=3, num_class_embeds=4)  # 3 classes + the null class 3
    with torch.no_grad():
        unet.class_embedding.weight.mul_(5)
    model = from_diffusers(unet, {"beta_schedule": "linear"})
    assert model.num_classes == 3
    x, t = _noise(), torch.full((3,), 0.5)
    with torch.no_grad():
        null = model(x, t)
        torch.testing.assert_close(null, model(x, t, labels=torch.full((3,), 3)), rtol=0, atol=0)
        assert not torch.allclose(null, model(x, t, labels=torch.tensor([0, 1, 2])))
        _, _, temb = model(x, t, return_features=True, labels=torch.tensor([0, 1, 2]))
        _, _, temb_null = model(x, t, return_features=True)
        assert not torch.allclose(temb, temb_null)  # the head sees the class embedding too
    from genie_fast.guidance import conditioned
    guided = conditioned(model, torch.tensor([0, 1, 2]), 2.0, batch=3)
    x0, nfe = genie_fast.sample(guided, noise=x, solver="dpmpp_2m", nfe=8)
    assert bool(torch.isfinite(x0).all()) and nfe == 8


def test_head_file_checks_the_unet(model_dir, tmp_path, unet):
    from genie_fast.generate import weights_hash
    net = load_diffusers(model_dir, head=None)
    head = GenieHead(HeadConfig.for_unet(net, width=8))
    torch.nn.init.normal_(head.conv_out.weight, std=0.1)
    stem = save_head(head, tmp_path, unet_sha256=weights_hash(unet), provenance={"note": "test"})
    assert stem == tmp_path / "genie_head"
    cfg = json.loads((tmp_path / "genie_head.json").read_text())
    assert cfg["head"]["width"] == 8 and cfg["provenance"] == {"note": "test"}
    other = _tiny_unet(seed=5)
    with pytest.raises(ValueError, match="other UNet weights"):
        from_diffusers(other, {}, head_path=tmp_path)
    model = from_diffusers(other, {}, head_path=tmp_path, check_unet=False)
    assert callable(model.eps_and_head)
    with pytest.raises(ValueError, match="features"):
        load_head(tmp_path, from_diffusers(_tiny_unet(block_out_channels=(8, 16), norm_num_groups=4), {}))
    with pytest.raises(FileNotFoundError):
        load_head(tmp_path / "missing")


# --------------------------------------------------------------------------- distillation CLI

def test_distill_cli_data_free_resume_and_the_saved_head(model_dir, tmp_path):
    import shutil
    mdir = tmp_path / "model"
    shutil.copytree(model_dir, mdir)
    run = tmp_path / "run"
    common = ["--diffusers", str(mdir), "--out", str(run), "--batch", "4", "--pool", "8", "--pool-nfe", "4",
              "--threads", "1", "--log-every", "1", "--lr", "1e-2", "--warmup", "1"]
    assert main(["distill", *common, "--steps", "2"]) == 0
    assert (mdir / "genie_head.safetensors").exists() and (mdir / "genie_head.json").exists()
    state = torch.load(run / "ckpt.pt", weights_only=True)
    assert state["step"] == 2
    pool_mtime = (run / "pool.pt").stat().st_mtime_ns
    head_after_2 = load_head(mdir)
    assert main(["distill", *common, "--steps", "2"]) == 2   # a fresh start over a run is refused
    assert main(["distill", *common, "--steps", "4", "--resume"]) == 0
    state = torch.load(run / "ckpt.pt", weights_only=True)
    assert state["step"] == 4 and (run / "pool.pt").stat().st_mtime_ns == pool_mtime
    log = (run / "log.txt").read_text()
    assert "# start step=0" in log and "# start step=2" in log and "step 4 loss" in log

    # the head beside the model is the run's EMA head, and the loaded model uses it
    model = load_diffusers(mdir)
    assert callable(model.eps_and_head)
    w_saved = model.head.conv_out.weight
    assert not torch.equal(w_saved, head_after_2.conv_out.weight)
    torch.testing.assert_close(w_saved, state["ema_head"]["conv_out.weight"], rtol=0, atol=0)
    x, t = _noise(), torch.tensor([0.9, 0.4, 0.1])
    with torch.no_grad():
        eps, head_out = model.eps_and_head(x, t)
        _, feats, temb = model.unet(x, t, return_features=True)
        manual = GenieHead(model.head.config)
        manual.load_state_dict(state["ema_head"])
        torch.testing.assert_close(head_out, manual(x, eps, feats, temb), rtol=0, atol=0)
    x0, nfe = genie_fast.sample(model, noise=x, solver="genie", nfe=5)
    assert bool(torch.isfinite(x0).all()) and nfe == 5

    # genie-fast generate samples the saved model with its head
    assert main(["generate", "--diffusers", str(mdir), "--seeds", "0-4", "--outdir", str(tmp_path / "gen"),
                 "--batch", "3", "--solver", "genie", "--nfe", "4", "--threads", "1", "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "gen" / "manifest.json").read_text())
    assert manifest["model"]["kind"] == "diffusers" and manifest["model"]["head"] is True
    with np.load(tmp_path / "gen" / "samples.npz") as f:
        assert f["arr_0"].shape == (5, 8, 8, 3)


def test_distill_data_from_images(model_dir, tmp_path):
    from PIL import Image
    from genie_fast.distill_diffusers import load_images
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (12, 10), dtype=np.uint8)).save(folder / f"{i}.png")
    x, labels = load_images(folder, (1, 8, 8))
    assert x.shape == (5, 1, 8, 8) and labels is None and float(x.min()) >= -1 and float(x.max()) <= 1
    u8 = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=u8, arr_1=np.arange(6))
    x, labels = load_images(tmp_path / "s.npz", (1, 8, 8))
    torch.testing.assert_close(x, torch.from_numpy(u8[..., :1]).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert labels.tolist() == list(range(6))
    with pytest.raises(ValueError, match="model wants"):
        load_images(tmp_path / "s.npz", (1, 16, 16))
    run = tmp_path / "run"
    assert main(["distill", "--diffusers", str(model_dir), "--out", str(run), "--data", str(folder), "--steps", "1",
                 "--batch", "4", "--threads", "1", "--head-out", str(tmp_path / "head")]) == 0
    assert (tmp_path / "head.safetensors").exists() and not (run / "pool.pt").exists()
    assert math.isfinite(float(torch.load(run / "ckpt.pt", weights_only=True)["wall_s"]))


def test_distill_cli_target_secant_by_default_and_its_arguments(model_dir, tmp_path, capsys):
    """distill --diffusers distils against the secant target unless told otherwise (--target jvp),
    takes --span-t, records both in the checkpoint and the head, and refuses to resume with others."""
    from genie_fast.distill import DEFAULT_SPAN_T
    from genie_fast.distill_diffusers import DIFFUSERS_TARGET
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "d.npz", arr_0=rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8))

    def run(name, *extra):
        return main(["distill", "--diffusers", str(model_dir), "--data", str(tmp_path / "d.npz"), "--batch", "4",
                     "--threads", "1", "--out", str(tmp_path / name), "--head-out", str(tmp_path / f"head_{name}"),
                     *extra])

    def saved(name):
        state = torch.load(tmp_path / name / "ckpt.pt", weights_only=True)
        prov = load_head(tmp_path / f"head_{name}").provenance
        assert (prov["target"], prov["span_t"]) == (state["target"], state["span_t"])
        return state["target"], state["span_t"], state["step"]

    assert DIFFUSERS_TARGET == "secant"
    assert run("default", "--steps", "1") == 0
    assert saved("default") == ("secant", DEFAULT_SPAN_T, 1)
    assert run("default", "--steps", "2", "--resume", "--target", "jvp") == 2
    assert "--target secant --span-t 0.01" in capsys.readouterr().err
    assert run("default", "--steps", "2", "--resume", "--span-t", "0.02") == 2
    assert run("default", "--steps", "2", "--resume") == 0
    assert saved("default") == ("secant", DEFAULT_SPAN_T, 2)
    assert run("wide", "--steps", "1", "--target", "secant", "--span-t", "0.05") == 0
    assert saved("wide") == ("secant", 0.05, 1)
    assert run("jvp", "--steps", "1", "--target", "jvp") == 0
    assert saved("jvp") == ("jvp", None, 1)
    capsys.readouterr()
    # a span that does not fit in [t_end, 1] = [1/1000, 1], or a span with the JVP target
    for extra in (("--span-t", "0"), ("--span-t", "0.9995"), ("--span-t", "nan"),
                  ("--target", "jvp", "--span-t", "0.01")):
        assert run("bad", "--steps", "1", *extra) == 2
        assert "--span-t" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
