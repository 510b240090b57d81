"""Text-conditioned diffusers UNets (UNet2DConditionModel) in latent space through ``cond=``: parity of
ddim and dpmpp_2m with diffusers' own schedulers and with a guided loop written the way diffusers'
pipelines write it, every head-free solver, the JVP through cross-attention, the graph inputs,
the VAE decoder. Tiny random models, float32 (float64 for the reference), nothing from a hub."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import genie_fast  # noqa: E402
from genie_fast.engine import SamplingEngine, engine_for  # noqa: E402
from genie_fast.guidance import Conditioned, wrapper_for  # noqa: E402
from genie_fast.models.diffusers import from_diffusers, scheduler_grid  # noqa: E402
from genie_fast.solvers import HEAD_SOLVERS, SOLVERS, jvp  # noqa: E402

from test_diffusers import _assert_same_roundoff  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}  # Stable Diffusion's
L, D = 5, 12  # tokens, embedding width


def _tiny_cond_unet(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, cross_attention_dim=D,
               attention_head_dim=4)
    cfg.update(kw)
    return diffusers.UNet2DConditionModel(**cfg).eval()


def _sdxl_like_unet(seed=1):
    """addition_embed_type 'text_time' (SDXL's added conditions: pooled text embeds and time ids)."""
    return _tiny_cond_unet(seed, addition_embed_type="text_time", addition_time_embed_dim=4,
                           projection_class_embeddings_input_dim=8 + 6 * 4)


@pytest.fixture(scope="module")
def unet():
    return _tiny_cond_unet()


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _cond(b=2, seed=10, sdxl=False):
    """(cond, negative_cond) of b samples; SDXL-style adds text_embeds / time_ids (time ids shared)."""
    cond = {"encoder_hidden_states": _randn(b, L, D, seed=seed)}
    neg = {"encoder_hidden_states": _randn(b, L, D, seed=seed + 1)}
    if sdxl:
        cond["text_embeds"] = _randn(b, 8, seed=seed + 2)
        cond["time_ids"] = torch.tensor([[8.0, 8.0, 0.0, 0.0, 8.0, 8.0]]).expand(b, 6).contiguous()
        neg["text_embeds"] = _randn(b, 8, seed=seed + 3)
    return cond, neg


def _pipeline_loop(unet, scheduler, latents, cond, neg, scale):
    """The denoising loop of diffusers' StableDiffusion(XL)Pipeline: [negative | conditional] in one
    batch, noise_pred = uncond + scale (text - uncond), then scheduler.step."""
    added = {k: torch.cat([neg.get(k, v), v]) for k, v in cond.items() if k in ("text_embeds", "time_ids")}
    ehs = torch.cat([neg["encoder_hidden_states"], cond["encoder_hidden_states"]]) if scale != 1 else \
        cond["encoder_hidden_states"]
    if scale == 1:
        added = {k: v for k, v in cond.items() if k in ("text_embeds", "time_ids")}
    latents = latents * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            inp = torch.cat([latents] * 2) if scale != 1 else latents
            inp = scheduler.scale_model_input(inp, t)
            pred = unet(inp, t, encoder_hidden_states=ehs, added_cond_kwargs=added or None).sample
            if scale != 1:
                uncond, text = pred.chunk(2)
                pred = uncond + scale * (text - uncond)
            latents = scheduler.step(pred, t, latents).prev_sample
    return latents


SCHEDULERS = {
    "ddim": lambda pt: diffusers.DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False,
                                               steps_offset=1, prediction_type=pt),
    "ddim_alpha_one": lambda pt: diffusers.DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=True,
                                                         prediction_type=pt),
    "dpmpp_2m": lambda pt: diffusers.DPMSolverMultistepScheduler(**SD_BETAS, algorithm_type="dpmsolver++",
                                                                 solver_order=2, prediction_type=pt),
}


def _parity(unet, which, prediction_type, scale, sdxl=False, steps=10):
    """(|pipeline32 - exact|, |genie_fast32 - exact|, scale of the result): exact = genie_fast's float64
    solver on a float64 copy of the UNet, with the same conditioning."""
    solver = "dpmpp_2m" if which.startswith("dpmpp") else "ddim"
    sched = SCHEDULERS[which](prediction_type)
    sched.set_timesteps(steps)
    cond, neg = _cond(sdxl=sdxl)
    x = _randn(2, 4, 8, 8, seed=1)
    ref32 = _pipeline_loop(unet, sched, x.clone(), cond, neg, scale)
    g = scheduler_grid(sched)
    kw = dict(solver=solver, nfe=None, guidance_scale=scale, **g)
    if scale != 1:
        kw["negative_cond"] = neg
    got32, nfe = genie_fast.sample(from_diffusers(unet, sched), noise=x, cond=cond, **kw)
    assert nfe == (len(g["grid"]) - 1 + g["denoise"]) * (2 if scale != 1 else 1)
    as64 = lambda d: {k: v.double() for k, v in d.items()}  # noqa: E731
    if scale != 1:
        kw["negative_cond"] = as64(neg)
    exact, _ = genie_fast.sample(from_diffusers(copy.deepcopy(unet).double(), sched), noise=x.double(),
                                 cond=as64(cond), dtype=torch.float64, **kw)
    err = lambda a: float((a.double() - exact).abs().max())  # noqa: E731
    return err(ref32), err(got32), float(exact.abs().max())


@pytest.mark.parametrize("which", sorted(SCHEDULERS))
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_guided_loop_matches_the_diffusers_pipeline_loop(unet, which, scale):
    e_d, e_g, size = _parity(unet, which, "epsilon", scale)
    _assert_same_roundoff(e_d, e_g, size)


@pytest.mark.parametrize("which", ["ddim", "dpmpp_2m"])
def test_v_prediction_and_sdxl_added_conditions(which):
    e_d, e_g, size = _parity(_sdxl_like_unet(), which, "v_prediction", 3.0, sdxl=True)
    _assert_same_roundoff(e_d, e_g, size)


def test_guided_eps_is_the_pipelines_combination_and_the_branches_are_the_unets(unet):
    model = from_diffusers(unet, SD_BETAS)
    cond, neg = _cond(b=3, seed=4)
    x, t = _randn(3, 4, 8, 8, seed=5), torch.tensor([0.9, 0.5, 0.1])
    g = Conditioned(model, guidance_scale=2.5, cond=cond, negative_cond=neg)
    assert g.evals_per_call == 2
    with torch.no_grad():
        c = unet(x, 1000 * t - 1, encoder_hidden_states=cond["encoder_hidden_states"]).sample
        u = unet(x, 1000 * t - 1, encoder_hidden_states=neg["encoder_hidden_states"]).sample
        torch.testing.assert_close(g(x, t), u + 2.5 * (c - u), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(Conditioned(model, cond=cond)(x, t), c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_every_solver_without_a_head_runs_and_the_head_solvers_are_refused(unet, solver):
    model = from_diffusers(unet, SD_BETAS)
    cond, neg = _cond()
    x = _randn(2, 4, 8, 8, seed=3)
    kw = dict(noise=x, solver=solver, cond=cond, negative_cond=neg, guidance_scale=3.0)
    if solver in HEAD_SOLVERS:
        with pytest.raises(TypeError, match="needs d eps/d gamma"):
            genie_fast.sample(model, nfe=6, **kw)
        return
    out, nfe = genie_fast.sample(model, steps=2, **kw)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
    assert nfe == genie_fast.nfe_of(solver, 2, afs=True) * 2  # both branches in one call: 2 NFE per evaluation


def test_genie_exact_runs_its_jvp_through_cross_attention(unet):
    """The x tangent of the guided (two-branch, cross-attention) eps against central differences in
    float64; then genie_exact samples with guidance."""
    model = from_diffusers(copy.deepcopy(unet).double(), SD_BETAS)
    cond, neg = _cond()
    g = Conditioned(model, guidance_scale=3.0, cond={k: v.double() for k, v in cond.items()},
                    negative_cond={k: v.double() for k, v in neg.items()})
    x, t = _randn(2, 4, 8, 8, seed=6).double(), torch.tensor([0.7, 0.3], dtype=torch.float64)
    dx = _randn(2, 4, 8, 8, seed=7).double()
    with torch.no_grad():
        _, tangent = jvp(g, (x, t), (dx, torch.zeros_like(t)))
        h = 1e-5
        fd = (g(x + h * dx, t) - g(x - h * dx, t)) / (2 * h)
    assert float((tangent - fd).norm() / fd.norm()) < 1e-7
    out, nfe = genie_fast.sample(model, noise=x, solver="genie_exact", steps=2, cond=g.cond, negative_cond=g.negative_cond,
                                 guidance_scale=3.0, dtype=torch.float64)
    assert bool(torch.isfinite(out).all()) and nfe == genie_fast.nfe_of("genie_exact", 2, afs=True) * 2


def test_new_values_of_the_same_shapes_replay_the_same_graph_key(unet):
    """The conditioning tensors are inputs of the wrapper's buffers, which the engine's graphs read:
    new prompts (and a new scale) of the same shapes reuse the wrapper, its engine and its key (no
    new plan, no new capture), and the result is that of the new values, not of the old ones."""
    model = from_diffusers(unet, SD_BETAS)
    x = _randn(2, 4, 8, 8, seed=8)
    (c1, n1), (c2, n2) = _cond(seed=20), _cond(seed=30)
    kw = dict(noise=x, solver="dpmpp_2m", steps=3)
    a, _ = genie_fast.sample(model, cond=c1, negative_cond=n1, guidance_scale=3.0, **kw)
    w = wrapper_for(model, 2, cond=c1, negative_cond=n1, guidance_scale=3.0)
    eng = engine_for(w, torch.device("cpu"))
    plans, memo, runs = list(eng._plans), dict(eng._memo), eng.stats["eager_runs"]
    b, _ = genie_fast.sample(model, cond=c2, negative_cond=n2, guidance_scale=2.0, **kw)
    assert wrapper_for(model, 2, cond=c2, negative_cond=n2, guidance_scale=2.0) is w
    assert list(eng._plans) == plans and eng._memo == memo and eng.stats["eager_runs"] == runs + 1
    fresh, _ = genie_fast.sample(Conditioned(model, guidance_scale=2.0, cond=c2, negative_cond=n2), **kw)
    torch.testing.assert_close(b, fresh, rtol=0, atol=0)
    assert not torch.equal(a, b)
    # other shapes (a longer prompt) are another wrapper, another key
    c3 = {"encoder_hidden_states": _randn(2, L + 2, D, seed=40)}
    n3 = {"encoder_hidden_states": _randn(2, L + 2, D, seed=41)}
    assert wrapper_for(model, 2, cond=c3, negative_cond=n3, guidance_scale=2.0) is not w


def test_the_engine_takes_cond_and_keeps_one_engine_per_input_signature(unet):
    model = from_diffusers(unet, SD_BETAS)
    eng = SamplingEngine(model, device="cpu")
    x = _randn(2, 4, 8, 8, seed=9)
    (c1, n1), (c2, n2) = _cond(seed=50), _cond(seed=60)
    a, nfe = eng.sample(x, solver="ddim", steps=3, cond=c1, negative_cond=n1, guidance_scale=3.0)
    sub = eng._conditioned(2, c1, n1, 3.0)[0]
    info = sub.cache_info()
    b, _ = eng.sample(x, solver="ddim", steps=3, cond=c2, negative_cond=n2, guidance_scale=3.0)
    assert eng._conditioned(2, c2, n2, 3.0)[0] is sub and sub.cache_info()["plans"] == info["plans"]
    ref, ref_nfe = genie_fast.sample(model, noise=x, solver="ddim", steps=3, cond=c2, negative_cond=n2,
                                     guidance_scale=3.0)
    torch.testing.assert_close(b, ref, rtol=0, atol=0)
    assert nfe == ref_nfe == 3 * 2 - 2  # AFS spares one guided evaluation
    z, _ = eng.encode(a, solver="ddim", steps=3, cond=c1, negative_cond=n1, guidance_scale=3.0)
    z_ref, _ = genie_fast.encode(model, a, solver="ddim", steps=3, cond=c1, negative_cond=n1, guidance_scale=3.0)
    torch.testing.assert_close(z, z_ref, rtol=0, atol=0)


@pytest.mark.cuda
def test_new_prompts_replay_the_captured_graph_on_cuda(unet):
    model = from_diffusers(copy.deepcopy(unet).cuda(), SD_BETAS)
    eng = SamplingEngine(model, device="cuda", net_dtype=torch.float32)
    x = _randn(2, 4, 8, 8, seed=8).cuda()
    outs = []
    for seed in (70, 80):
        c, n = _cond(seed=seed)
        c, n = ({k: v.cuda() for k, v in d.items()} for d in (c, n))
        outs.append(eng.sample(x, solver="dpmpp_2m", steps=4, cond=c, negative_cond=n, guidance_scale=3.0)[0])
        sub = eng._conditioned(2, c, n, 3.0)[0]
        eager = SamplingEngine(model, device="cuda", net_dtype=torch.float32, use_graphs=False)
        want = eager.sample(x, solver="dpmpp_2m", steps=4, cond=c, negative_cond=n, guidance_scale=3.0)[0]
        torch.testing.assert_close(outs[-1], want, rtol=1e-4, atol=1e-4)
    assert sub.stats["captures"] == 1 and sub.stats["replays"] == 2


def test_latent_model_decodes_with_its_vae(unet):
    """A latent model (from_diffusers(vae=)) says so, and sample(decode=True) returns the VAE's
    images of the latents, decoded the way diffusers' pipelines decode them."""
    torch.manual_seed(3)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
                                  layers_per_block=1, sample_size=16).eval()
    model = from_diffusers(unet, SD_BETAS, vae=vae)
    assert model.space == "latent" and from_diffusers(unet, SD_BETAS).space == "pixel"
    cond, neg = _cond()
    x = _randn(2, 4, 8, 8, seed=11)
    kw = dict(noise=x, solver="dpmpp_2m", steps=3, cond=cond, negative_cond=neg, guidance_scale=3.0)
    latents, nfe = genie_fast.sample(model, **kw)
    images, nfe2 = genie_fast.sample(model, decode=True, **kw)
    assert images.shape == (2, 3, 16, 16) and nfe2 == nfe
    with torch.no_grad():
        want = vae.decode(latents / vae.config.scaling_factor).sample
    torch.testing.assert_close(images, want, rtol=1e-5, atol=1e-5)
    own = genie_fast.sample(model, decode=lambda z: z * 2, **kw)[0]
    torch.testing.assert_close(own, latents * 2, rtol=0, atol=0)
    with pytest.raises(ValueError, match="decode=True"):
        genie_fast.sample(from_diffusers(unet, SD_BETAS), decode=True, **kw)
    with pytest.raises(TypeError, match="decode"):
        genie_fast.sample(model, decode="vae", **kw)


def test_null_cond_is_the_default_negative_branch(unet):
    """from_diffusers(null_cond=) (e.g. the empty prompt's embeddings): guidance without
    negative_cond uses it, and the default scale then applies; without it guidance is refused."""
    cond, neg = _cond()
    empty = neg["encoder_hidden_states"][:1]
    model = from_diffusers(unet, SD_BETAS, null_cond={"encoder_hidden_states": empty})
    x = _randn(2, 4, 8, 8, seed=12)
    a, nfe = genie_fast.sample(model, noise=x, solver="ddim", steps=3, cond=cond, guidance_scale=3.0)
    b, _ = genie_fast.sample(model, noise=x, solver="ddim", steps=3, cond=cond, guidance_scale=3.0,
                             negative_cond={"encoder_hidden_states": empty.expand(2, L, D)})
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    _, nfe_default = genie_fast.sample(model, noise=x, solver="ddim", steps=3, cond=cond)
    assert nfe_default == nfe  # guided by default (genie_fast.guidance.DEFAULT_GUIDANCE_SCALE)
    plain = from_diffusers(unet, SD_BETAS)
    _, nfe_plain = genie_fast.sample(plain, noise=x, solver="ddim", steps=3, cond=cond)
    assert nfe_plain * 2 == nfe  # no negative branch known: the conditional model alone
    with pytest.raises(ValueError, match="negative_cond"):
        genie_fast.sample(plain, noise=x, solver="ddim", steps=3, cond=cond, guidance_scale=3.0)


# --------------------------------------------------------------------------- files: distill, generate

def _tiny_vae(seed=3):
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
                                   layers_per_block=1, sample_size=16).eval()


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A latent text-to-image pipeline folder (unet/ + scheduler/ + vae/) written with save_pretrained,
    and .npz files of conditioning (3 prompts' embeddings, the empty prompt's)."""
    root = tmp_path_factory.mktemp("tiny_latent_pipeline")
    _tiny_cond_unet().save_pretrained(root / "unet")
    diffusers.DDPMScheduler(**SD_BETAS).save_pretrained(root / "scheduler")
    _tiny_vae().save_pretrained(root / "vae")
    np = pytest.importorskip("numpy")
    np.savez(root / "prompts.npz", encoder_hidden_states=_randn(3, L, D, seed=90).numpy())
    np.savez(root / "empty.npz", encoder_hidden_states=_randn(1, L, D, seed=91).numpy())
    return root


def test_head_sees_the_features_and_embedding_of_the_conditioned_call():
    """The head's time embedding is the one the residual blocks see: time + added conditions
    (SDXL's text_embeds / time_ids) after time_embed_act; its features are those of the same call."""
    from genie_fast.models.head import GenieHead, HeadConfig
    from genie_fast.models.diffusers import DiffusersGenieModel
    unet = _sdxl_like_unet()
    net = from_diffusers(unet, SD_BETAS)
    model = DiffusersGenieModel(net, GenieHead(HeadConfig.for_unet(net)), net.schedule)
    cond, _ = _cond(sdxl=True)
    x, t = _randn(2, 4, 8, 8, seed=13), torch.tensor([0.8, 0.2])
    with torch.no_grad():
        tau = 1000 * t - 1
        emb = unet.time_embedding(unet.get_time_embed(x, tau))
        emb = emb + unet.get_aug_embed(emb, cond["encoder_hidden_states"], {k: cond[k] for k in ("text_embeds",
                                                                                                  "time_ids")})
        eps, feats, temb = net(x, t, return_features=True, **cond)
        torch.testing.assert_close(temb, emb, rtol=1e-6, atol=1e-6)
        other = dict(cond, text_embeds=cond["text_embeds"] + 1)
        assert not torch.allclose(net(x, t, return_features=True, **other)[2], temb)
        eps2, head = model.eps_and_head(x, t, **cond)
        torch.testing.assert_close(eps2, eps, rtol=0, atol=0)
        torch.testing.assert_close(head, model.head(x, eps, feats, temb), rtol=0, atol=0)


def test_distill_a_head_for_a_latent_text_unet_then_sample_and_generate(pipeline_dir, tmp_path):
    """distill --diffusers with --cond / --negative-cond (data-free: a pool of latents), then the
    loaded model (head, VAE decoder) samples with genie and genie_multistep under guidance, and
    generate --cond writes decoded images, one prompt row per seed."""
    import json

    import numpy as np
    from genie_fast.cli import main
    from genie_fast.models.diffusers import load_diffusers

    run = tmp_path / "run"
    common = ["distill", "--diffusers", str(pipeline_dir), "--out", str(run), "--pool", "3", "--pool-nfe", "4",
              "--batch", "2", "--threads", "1", "--head-out", str(tmp_path / "head"),
              "--cond", str(pipeline_dir / "prompts.npz")]
    no_cond = ["distill", "--diffusers", str(pipeline_dir), "--out", str(tmp_path / "nocond"), "--steps", "1",
               "--threads", "1", "--head-out", str(tmp_path / "nohead")]
    assert main(no_cond) == 2 and not (tmp_path / "nohead.safetensors").exists()  # no --cond: refused
    assert main([*common, "--negative-cond", str(pipeline_dir / "empty.npz"), "--steps", "2"]) == 0
    pool = torch.load(run / "pool.pt", weights_only=True)["x0"]
    assert pool.shape == (3, 4, 8, 8) and float(pool.abs().max()) > 0  # latents, not clamped images

    model = load_diffusers(pipeline_dir, head=tmp_path / "head")
    assert callable(model.eps_and_head) and model.space == "latent" and callable(model.decode)
    prompts = {"encoder_hidden_states": torch.from_numpy(np.load(pipeline_dir / "prompts.npz")["encoder_hidden_states"])}
    empty = {"encoder_hidden_states": torch.from_numpy(np.load(pipeline_dir / "empty.npz")["encoder_hidden_states"])}
    x = _randn(3, 4, 8, 8, seed=14)
    for solver in ("genie", "genie_multistep"):
        out, nfe = genie_fast.sample(model, noise=x, solver=solver, nfe=8, cond=prompts, negative_cond=empty,
                                     guidance_scale=3.0, decode=True)
        assert out.shape == (3, 3, 16, 16) and bool(torch.isfinite(out).all()) and nfe == 8

    gen = tmp_path / "gen"
    argv = ["generate", "--diffusers", str(pipeline_dir), "--seeds", "0-2", "--outdir", str(gen), "--batch", "2",
            "--solver", "dpmpp_2m", "--nfe", "6", "--threads", "1", "--no-progress",
            "--cond", str(pipeline_dir / "prompts.npz"), "--negative-cond", str(pipeline_dir / "empty.npz"),
            "--guidance-scale", "3"]
    assert main(argv[:-6]) == 2 and not gen.exists()  # a text UNet without --cond: refused before any work
    assert main(argv) == 0
    manifest = json.loads((gen / "manifest.json").read_text())
    assert manifest["identity"]["cond_sha256"] and manifest["identity"]["guidance_scale"] == 3.0
    with np.load(gen / "samples.npz") as f:
        images = f["arr_0"]
    assert images.shape == (3, 16, 16, 3)
    # seed 2's image is prompt row 2's, whatever batch it ran in
    from genie_fast.files import to_uint8
    from genie_fast.noise import seed_noise
    one, _ = genie_fast.sample(model, noise=seed_noise([2], (4, 8, 8)), solver="dpmpp_2m", nfe=6,
                               cond={"encoder_hidden_states": prompts["encoder_hidden_states"][2:]},
                               negative_cond=empty, guidance_scale=3.0, decode=True)
    assert np.abs(to_uint8(one)[0].astype(int) - images[2].astype(int)).max() <= 1
    # a rerun with other conditioning is refused (the manifest's content hash)
    np.savez(tmp_path / "other.npz", encoder_hidden_states=_randn(3, L, D, seed=99).numpy())
    assert main([*argv[:-5], str(tmp_path / "other.npz"), *argv[-4:]]) == 2
