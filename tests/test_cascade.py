"""The cascade (issue 32): a base model and a super-resolution model conditioned on its samples.

Tiny random networks (``tiny_low``: 1x4x4, ``tiny_sr``: 4x4 -> 8x8, both with 10 classes): shapes,
the low-resolution input and its augmentation level reaching the network and the head through
``cond=``, NFE accounting (the sum of both stages'), the same graph key replayed for new base
samples, the cascade file, training and distillation of both stages (resumed exactly after a
kill -9), the command line, and bad inputs refused by name.
"""
import json

import pytest
import torch

import genie_fast
from genie_fast.cascade import Cascade, load_cascade, sample_cascade, save_cascade
from genie_fast.cli import main
from genie_fast.engine import engine_for
from genie_fast.guidance import Conditioned, wrapper_for
from genie_fast.models.default import ModelFileError, load_default, load_model, save_model
from genie_fast.models.head import GenieModel
from genie_fast.models.unet import CONFIGS, UNet, UNetConfig, augment_low_res, downsample
from genie_fast.schedule import VPSchedule
from genie_fast.train import load_checkpoint
from genie_fast.training.cascade import fit_images, init_low_res_from, low_res_cond

from _helpers import randomize

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(seed=0):
    base = randomize(GenieModel(UNet("tiny_low")), 0.05, seed).eval()
    up = randomize(GenieModel(UNet("tiny_sr")), 0.05, seed + 1).eval()
    return base, up


def _cond(b=3, seed=0, level=0.1):
    g = torch.Generator().manual_seed(seed)
    return {"low_res": torch.randn(b, 1, 4, 4, generator=g), "aug_level": torch.full((b,), level)}


# --------------------------------------------------------------------------- the network


def test_configs_and_the_bundled_file_format_are_unchanged():
    """low_res_size is written only where set: the bundled model's config reads and writes as before."""
    model = load_default()
    stored = json.loads((genie_fast.models.default.default_model_path().with_suffix(".json")).read_text())["unet"]
    assert model.unet.config.to_dict() == {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}
    assert "low_res_size" not in model.unet.config.to_dict() and model.cond_names == ("labels",)
    sr = CONFIGS["fmnist_sr"]
    assert sr.to_dict()["low_res_size"] == 16 and UNetConfig.from_dict(sr.to_dict()) == sr
    assert CONFIGS["fmnist16_cond"].image_size == 16 and CONFIGS["fmnist16_cond"].low_res_size == 0
    # the base model has the bundled network's weights (it may start from them: --init-model)
    shapes = {k: v.shape for k, v in model.unet.state_dict().items()}
    assert {k: v.shape for k, v in UNet("fmnist16_cond").state_dict().items()} == shapes
    assert GenieModel(UNet(sr)).cond_names == ("labels", "low_res", "aug_level")


def test_sr_model_file_round_trip(tmp_path):
    _, up = _pair()
    stem = save_model(up, tmp_path / "sr")
    back = load_model(stem)
    assert back.unet.config == up.unet.config
    for (name, a), (_, b) in zip(sorted(back.state_dict().items()), sorted(up.state_dict().items())):
        assert torch.equal(a, b), name  # the weights exactly (loaded float32 models are channels-last on the CPU)
    x, t, c = torch.randn(3, 1, 8, 8), torch.rand(3) * 0.9 + 0.05, _cond()
    with torch.no_grad():
        torch.testing.assert_close(back(x, t, **c), up.to(memory_format=torch.channels_last)(x, t, **c), rtol=0, atol=0)


def test_low_res_and_aug_level_change_eps_and_the_head_sees_them():
    _, up = _pair()
    x, t = torch.randn(3, 1, 8, 8), torch.full((3,), 0.5)
    with torch.no_grad():
        e0, h0 = up.eps_and_head(x, t, **_cond(seed=0))
        e1, h1 = up.eps_and_head(x, t, **_cond(seed=1))
        e2, h2 = up.eps_and_head(x, t, **_cond(seed=0, level=0.3))
        assert not torch.allclose(e0, e1) and not torch.allclose(h0, h1)   # the low-resolution image
        assert not torch.allclose(e0, e2) and not torch.allclose(h0, h2)   # its augmentation level
        # the head reads the features and embedding of the conditioned call
        eps, feats, temb = up.unet(x, t, return_features=True, **_cond(seed=1))
        torch.testing.assert_close(h1, up.head(x, eps, feats, temb), rtol=0, atol=0)
        # aug_level None is a clean input (level 0)
        c = _cond(seed=0)
        torch.testing.assert_close(up(x, t, low_res=c["low_res"]),
                                   up(x, t, low_res=c["low_res"], aug_level=torch.zeros(3)), rtol=0, atol=0)


def test_init_low_res_from_keeps_the_function_of_the_source():
    """New input channels and the augmentation embedding start at zero: the super-resolution network
    initialised from a network without a low-resolution input computes that network's eps."""
    src = randomize(UNet(UNetConfig(**{**CONFIGS["tiny_sr"].to_dict(), "low_res_size": 0})), 0.2, 3)
    sr = UNet("tiny_sr")
    init_low_res_from(sr, src.state_dict(), "test")
    x, t, labels = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([0, 4, 10])
    with torch.no_grad():
        torch.testing.assert_close(sr(x, t, labels=labels, **_cond(level=0.2)), src(x, t, labels=labels),
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not match"):
        init_low_res_from(UNet("tiny_sr"), UNet(UNetConfig(**{**CONFIGS["tiny_cond"].to_dict(), "nf": 16})).state_dict(),
                          "other")


def test_training_data_of_both_stages():
    x = torch.randn(5, 1, 32, 32)
    assert fit_images(x, CONFIGS["fmnist16_cond"]).shape == (5, 1, 16, 16)
    torch.testing.assert_close(downsample(x, 16)[0, 0, 0, 0], x[0, 0, :2, :2].mean())
    assert fit_images(x, CONFIGS["fmnist_sr"]) is x
    s = VPSchedule()
    y = torch.randn(4, 1, 4, 4)
    assert torch.equal(augment_low_res(y, torch.zeros(4), s, noise=torch.randn(4, 1, 4, 4)), y)
    z = torch.randn(4, 1, 4, 4)
    lvl = torch.full((4,), 0.2)
    torch.testing.assert_close(augment_low_res(y, lvl, s, noise=z), s.alpha(0.2) * y + s.sigma(0.2) * z)
    c = low_res_cond(torch.randn(64, 1, 8, 8), CONFIGS["tiny_sr"], 0.3, s, torch.Generator().manual_seed(0))
    assert c["low_res"].shape == (64, 1, 4, 4) and c["aug_level"].shape == (64,)
    assert 0 <= float(c["aug_level"].min()) and float(c["aug_level"].max()) <= 0.3 and c["aug_level"].std() > 0.05


# --------------------------------------------------------------------------- sampling


def test_shapes_nfe_and_stages_equal_their_sample_calls():
    base, up = _pair()
    cascade = Cascade(base, up, aug_level=0.1)
    x, nfe, low = sample_cascade(cascade, n=3, seed=5, base={"solver": "genie", "nfe": 4},
                                 upsampler={"solver": "dpmpp_2m", "steps": 3}, return_low_res=True)
    assert x.shape == (3, 1, 8, 8) and low.shape == (3, 1, 4, 4) and bool(torch.isfinite(x).all())
    assert nfe == 4 + genie_fast.nfe_of("dpmpp_2m", 3, afs=True)  # a budget of 4, and 3 steps (AFS: 2 NFE)
    # stage 1 is sample(base, n, seed); stage 2 is sample(upsampler) conditioned through cond=
    ref_low, nfe_low = genie_fast.sample(base, n=3, seed=5, solver="genie", nfe=4)
    torch.testing.assert_close(low, ref_low, rtol=0, atol=0)
    z_low, z_up, z_aug = genie_fast.cascade._noise(3, 5, None, (1, 4, 4), (1, 8, 8), (1, 4, 4))
    y = augment_low_res(ref_low.clamp(-1, 1), torch.full((3,), 0.1, dtype=torch.float64), up.schedule, noise=z_aug)
    ref, nfe_up = genie_fast.sample(up, noise=z_up, solver="dpmpp_2m", steps=3,
                                    cond={"low_res": y, "aug_level": torch.full((3,), 0.1)})
    torch.testing.assert_close(x, ref, rtol=0, atol=0)
    assert nfe == nfe_low + nfe_up
    # guided stages count 2 per evaluation, each with its own scale
    _, nfe_g = sample_cascade(cascade, n=2, labels=[1, 2], base={"solver": "ddim", "steps": 3, "guidance_scale": 2.0},
                              upsampler={"solver": "ddim", "steps": 2, "guidance_scale": 1.0})
    assert nfe_g == genie_fast.nfe_of("ddim", 3, afs=True, evals_per_call=2) + genie_fast.nfe_of("ddim", 2, afs=True)


def test_sample_i_depends_on_seed_and_i_only_and_the_aug_level_matters():
    cascade = Cascade(*_pair(), aug_level=0.05)
    kw = dict(base={"solver": "ddim", "steps": 3}, upsampler={"solver": "ddim", "steps": 3})
    a, _ = sample_cascade(cascade, n=4, seed=2, **kw)
    b, _ = sample_cascade(cascade, n=2, seed=2, **kw)
    torch.testing.assert_close(a[:2], b, rtol=1e-5, atol=1e-5)
    c, _ = sample_cascade(cascade, n=2, seed=3, **kw)
    d, _ = sample_cascade(cascade, n=2, seed=2, aug_level=0.25, **kw)
    assert not torch.allclose(b, c) and not torch.allclose(b, d)


def test_new_base_samples_replay_the_upsampler_graph_key():
    """The low-resolution input is a buffer of the upsampler's conditioning wrapper: a new batch of
    base samples (same shapes) reuses the wrapper, its engine and its key (no new plan)."""
    base, up = _pair()
    cascade = Cascade(base, up)
    kw = dict(base={"solver": "ddim", "steps": 3}, upsampler={"solver": "dpmpp_2m", "steps": 3})
    sample_cascade(cascade, n=2, seed=0, **kw)
    probe = _cond(b=2)
    w = wrapper_for(up, 2, cond=probe)
    eng = engine_for(w, torch.device("cpu"))
    plans, memo, runs = list(eng._plans), dict(eng._memo), eng.stats["eager_runs"]
    x, _, low = sample_cascade(cascade, n=2, seed=1, return_low_res=True, **kw)
    assert wrapper_for(up, 2, cond=probe) is w
    assert list(eng._plans) == plans and eng._memo == memo and eng.stats["eager_runs"] == runs + 1
    _, z_up, z_aug = genie_fast.cascade._noise(2, 1, None, (1, 4, 4), (1, 8, 8), (1, 4, 4))
    y = augment_low_res(low.clamp(-1, 1), torch.full((2,), cascade.aug_level, dtype=torch.float64), up.schedule,
                        noise=z_aug)
    fresh, _ = genie_fast.sample(Conditioned(up, cond={"low_res": y, "aug_level": torch.full((2,), cascade.aug_level)}),
                                 noise=z_up, solver="dpmpp_2m", steps=3)
    torch.testing.assert_close(x, fresh, rtol=0, atol=0)


@pytest.mark.cuda
def test_one_graph_per_stage_replayed_on_cuda():
    base, up = (m.cuda() for m in _pair())
    cascade = Cascade(base, up)
    kw = dict(base={"solver": "genie", "steps": 3}, upsampler={"solver": "genie", "steps": 3}, net_dtype=torch.float32)
    outs = [sample_cascade(cascade, n=2, seed=s, **kw)[0] for s in (0, 1)]
    eng_base = engine_for(base, torch.device("cuda", torch.cuda.current_device()))
    w = wrapper_for(up, 2, cond={k: v.cuda() for k, v in _cond(b=2).items()})
    eng_up = engine_for(w, torch.device("cuda", torch.cuda.current_device()))
    assert eng_base.stats["captures"] == 1 and eng_base.stats["replays"] == 2
    assert eng_up.stats["captures"] == 1 and eng_up.stats["replays"] == 2
    assert not torch.allclose(outs[0], outs[1])
    cpu = Cascade(*_pair())
    ref = sample_cascade(cpu, n=2, seed=1, device="cpu", **kw)[0]
    torch.testing.assert_close(outs[1].cpu(), ref, rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------- the file


def test_cascade_file_round_trip_and_refusals(tmp_path):
    base, up = _pair()
    b, u = save_model(base, tmp_path / "m" / "base"), save_model(up, tmp_path / "m" / "up")
    path = save_cascade(tmp_path / "c", b, u, aug_level=0.1, provenance={"by": "test"})
    assert path.name == "c.cascade.json"
    entry = json.loads(path.read_text())
    assert entry["base"] == "m/base" and entry["upsampler"] == "m/up" and entry["aug_level"] == 0.1
    c = load_cascade(tmp_path / "c")
    assert c.aug_level == 0.1 and c.provenance == {"by": "test"} and c.path == path
    x, _ = sample_cascade(tmp_path / "c", n=2, base={"steps": 2}, upsampler={"steps": 2})
    assert x.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="no low-resolution input"):
        save_cascade(tmp_path / "bad", u, b)
    for broken, match in ((dict(entry, format="x"), "expected format"), (dict(entry, upsampler=3), "'upsampler'"),
                          (dict(entry, aug_level=2), "aug_level"), (dict(entry, base="m/up"), "super-resolution")):
        (tmp_path / "b.cascade.json").write_text(json.dumps(broken))
        with pytest.raises(ModelFileError, match=match) as e:
            load_cascade(tmp_path / "b")
        assert "b.cascade.json" in str(e.value)
    (tmp_path / "b.cascade.json").write_text(json.dumps(dict(entry, base="m/none")))
    with pytest.raises(FileNotFoundError, match="none.json"):
        load_cascade(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_cascade(tmp_path / "missing")


# --------------------------------------------------------------------------- bad inputs


def test_bad_inputs_are_named():
    base, up = _pair()
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3)
    with pytest.raises(ValueError, match="needs low_res"):
        up(x, t)
    with pytest.raises(ValueError, match=r"low_res must be \(3, 1, 4, 4\)"):
        up(x, t, low_res=torch.randn(3, 1, 8, 8))
    with pytest.raises(ValueError, match="aug_level must be a float tensor of shape"):
        up(x, t, low_res=torch.randn(3, 1, 4, 4), aug_level=torch.zeros(3, 1))
    with pytest.raises(ValueError, match="without a low-resolution input"):
        base(torch.randn(3, 1, 4, 4), t, low_res=torch.randn(3, 1, 2, 2))
    with pytest.raises(ValueError, match="low_res_size 8 must be smaller"):
        UNetConfig(image_size=8, ch_mult=(1, 2), low_res_size=8)
    with pytest.raises(ValueError, match="no low-resolution input"):
        Cascade(base, base)
    with pytest.raises(ValueError, match="first stage"):
        Cascade(up, up)
    big = randomize(GenieModel(UNet("tiny_cond")), 0.05).eval()
    with pytest.raises(ValueError, match=r"samples \(1, 8, 8\) images; the upsampler takes .* \(1, 4, 4\)"):
        Cascade(big, up)
    cascade = Cascade(base, up)
    with pytest.raises(ValueError, match=r"base\['labels'\]: labels is shared by both stages"):
        sample_cascade(cascade, n=2, base={"labels": 1})
    with pytest.raises(ValueError, match=r"upsampler\['cond'\]: not an option .* the base model's samples"):
        sample_cascade(cascade, n=2, upsampler={"cond": {}})
    with pytest.raises(TypeError, match="upsampler must be a dict"):
        sample_cascade(cascade, n=2, upsampler=5)
    with pytest.raises(ValueError, match="aug_level .* must be a number in"):
        sample_cascade(cascade, n=2, aug_level=1.5)
    with pytest.raises(ValueError, match="give n="):
        sample_cascade(cascade)
    with pytest.raises(ValueError, match=r"noise\[1\] \(upsampler x_T\)"):
        sample_cascade(cascade, noise=(torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)))
    with pytest.raises(TypeError, match="cascade must be a Cascade"):
        sample_cascade(base, n=2)
    unconditional = randomize(GenieModel(UNet(UNetConfig(**{**CONFIGS["tiny_low"].to_dict(), "num_classes": 0}))))
    with pytest.raises(ValueError, match="base model is not class-conditional"):
        sample_cascade(Cascade(unconditional.eval(), up), n=2, labels=1)
    with pytest.raises(ValueError, match="cond\\['low_res'\\]: .* takes no conditioning input"):
        genie_fast.sample(base, n=2, cond={"low_res": torch.zeros(2, 1, 2, 2)})


# --------------------------------------------------------------------------- training and the command line


def _common(data_root):
    return ["--data-root", str(data_root), "--batch", "4", "--threads", "1", "--log-every", "1",
            "--ckpt-minutes", "0"]


def test_train_distill_export_bundle_and_sample_both_stages(tmp_path, data_root, capsys):
    common = _common(data_root)
    stems = {}
    for name, config in (("base", "tiny_low"), ("up", "tiny_sr")):
        run, head = tmp_path / name, tmp_path / f"{name}_head"
        assert main(["train", "--config", config, "--out", str(run), "--steps", "2", *common]) == 0
        assert load_checkpoint(run / "ckpt.pt")["step"] == 2
        assert main(["distill", "--unet-ckpt", str(run / "ckpt.pt"), "--out", str(head), "--steps", "2", *common]) == 0
        stems[name] = tmp_path / f"{name}_genie"
        assert main(["export", "--unet-ckpt", str(run / "ckpt.pt"), "--head-ckpt", str(head / "ckpt.pt"),
                     "--out", str(stems[name])]) == 0
    assert load_model(stems["up"]).unet.config == CONFIGS["tiny_sr"]
    assert main(["cascade", "--base", str(stems["base"]), "--upsampler", str(stems["up"]),
                 "--out", str(tmp_path / "tiny"), "--aug-level", "0.1"]) == 0
    assert main(["cascade", "--base", str(stems["base"]), "--upsampler", str(stems["up"]),
                 "--out", str(tmp_path / "tiny")]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    pytest.importorskip("PIL.Image")
    from genie_fast.files import read_png
    out, low = tmp_path / "c.png", tmp_path / "low.png"
    assert main(["sample", "--cascade", str(tmp_path / "tiny.cascade.json"), "--n", "3", "--labels", "0,1",
                 "--steps", "2", "--sr-solver", "ddim", "--sr-steps", "2", "--sr-guidance-scale", "1",
                 "--pairs", "--out", str(out), "--low-res-out", str(low), "--threads", "1"]) == 0
    msg = capsys.readouterr().out
    nfe = genie_fast.nfe_of(genie_fast.solvers.DEFAULT_SOLVER, 2, afs=True, evals_per_call=2) + \
        genie_fast.nfe_of("ddim", 2, afs=True)
    assert f"{nfe} NFE per sample for both stages" in msg and "aug level 0.1" in msg
    # --pairs: 2 rows (one per label) of 3 (base sample, result) pairs of 8x8 tiles with 2-pixel gaps
    assert read_png(out).shape[:2] == (2 * 10 + 2, 6 * 10 + 2)
    assert read_png(low).shape[:2] == (2 * 6 + 2, 3 * 6 + 2)


def test_train_and_distill_of_the_upsampler_resume_exactly_after_kill_9(tmp_path, data_root):
    """As tests/test_bad_inputs.py for the bundled model's runs: a run killed mid-way resumes from its
    last checkpoint k and ends equal to a run stopped cleanly at k and resumed."""
    from test_bad_inputs import _kill_during, _same_state, _step

    common = _common(data_root)
    n = 4
    for kind in ("train", "distill"):
        src = ["--config", "tiny_sr", "--aug-max", "0.2"] if kind == "train" else \
            ["--unet-ckpt", str(tmp_path / "train_ref" / "ckpt.pt"), "--aug-max", "0.2"]
        killed, ref = tmp_path / f"{kind}_killed", tmp_path / f"{kind}_ref"
        _kill_during([kind, *src, "--out", killed, "--steps", 10_000, *common], lambda: _step(killed / "ckpt.pt") >= 3)
        k = load_checkpoint(killed / "ckpt.pt")["step"]
        argv = [kind, *src, *common]
        assert main([*argv, "--out", str(killed), "--steps", str(k + n), "--resume"]) == 0
        assert main([*argv, "--out", str(ref), "--steps", str(k)]) == 0
        assert main([*argv, "--out", str(ref), "--steps", str(k + n), "--resume"]) == 0
        a, b = load_checkpoint(killed / "ckpt.pt"), load_checkpoint(ref / "ckpt.pt")
        assert a["step"] == b["step"] == k + n and a["aug_max"] == 0.2
        assert _same_state({k_: v for k_, v in a.items() if k_ != "unet_ckpt"},
                           {k_: v for k_, v in b.items() if k_ != "unet_ckpt"}), kind


def test_training_flags_refused_by_name(tmp_path, data_root, capsys):
    common = _common(data_root)
    run = tmp_path / "r"
    rc = main(["train", "--config", "tiny_sr", "--out", str(run), "--steps", "1", "--aug-max", "1.5", *common])
    assert rc == 2 and "--aug-max" in capsys.readouterr().err
    assert main(["train", "--config", "tiny_sr", "--out", str(run), "--steps", "1", *common]) == 0
    rc = main(["train", "--config", "tiny_sr", "--out", str(run), "--steps", "2", "--aug-max", "0.1", "--resume",
               *common])
    assert rc == 2 and "was trained with --aug-max 0.3, not 0.1" in capsys.readouterr().err
    rc = main(["train", "--config", "tiny_sr", "--out", str(tmp_path / "t"), "--steps", "1", "--null-teacher", "x",
               *common])
    assert rc == 2 and "--null-teacher" in capsys.readouterr().err
    for argv, match in ((["--sr-nfe", "3"], "--sr-nfe is a flag of the cascade's upsampler: it needs --cascade"),
                        (["--cascade", "x", "--model", "m"], "give --cascade FILE or --model STEM, not both"),
                        (["--cascade", "x", "--sr-solver", "nope"], "--sr-solver 'nope' is not a solver"),
                        (["--cascade", "x", "--aug-level", "2"], "--aug-level must be a finite number in"),
                        (["--cascade", str(tmp_path / "none")], "none.cascade.json not found")):
        rc = main(["sample", *argv, "--out", str(tmp_path / "g.png")])
        err = capsys.readouterr().err
        assert rc == 2 and match in err and len(err.strip().splitlines()) == 1, err


# --------------------------------------------------------------------------- the bundled cascade

def test_bundled_cascade_samples_and_its_upsampler_follows_its_input():
    """The bundled Fashion-MNIST cascade (16x16 base, 16 -> 32 upsampler): sample_cascade() with no
    file loads it; each 32x32 sample, average-pooled back to 16x16, is much closer to the base sample
    it was conditioned on than to the other base samples (an upsampler that ignored its input would
    be as close to any of them)."""
    cascade = load_cascade()
    assert cascade.base.image_shape == (1, 16, 16) and cascade.upsampler.image_shape == (1, 32, 32)
    x, nfe, x_low = sample_cascade(n=6, seed=3, base={"nfe": 5}, upsampler={"nfe": 5}, return_low_res=True)
    assert x.shape == (6, 1, 32, 32) and x_low.shape == (6, 1, 16, 16) and nfe == 10
    pooled = downsample(x.clamp(-1, 1), 16).flatten(1)
    dist = torch.cdist(pooled, x_low.clamp(-1, 1).flatten(1))  # [i, j]: sample i pooled vs base sample j
    own = dist.diagonal()
    others = (dist.sum(1) - own) / (len(own) - 1)
    assert bool((own < 0.5 * others).all()), (own, others)
