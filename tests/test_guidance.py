"""Classifier-free guidance: the Conditioned wrapper, its head combination, and the guided derivative."""
import math

import pytest
import torch

from genie_fast.guidance import Conditioned, check_labels, conditioned
from genie_fast.models.gmm import GaussianMixture
from genie_fast.schedule import VPSchedule

SHAPE = (1, 2, 2)


def _mixture():
    # 4 components in 2 classes, far enough apart that guidance moves samples
    return GaussianMixture.random(4, SHAPE, seed=3, spread=1.5, std_range=(0.3, 0.6),
                                  classes=[0, 0, 1, 1]).double()


def _points(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, *SHAPE, generator=g, dtype=torch.float64)
    t = 0.05 + 0.9 * torch.rand(b, generator=g, dtype=torch.float64)
    return x, t


def test_guided_eps_is_the_diffusers_combination():
    m = _mixture()
    x, t = _points()
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    for s in (0.0, 1.0, 2.5):
        g = Conditioned(m, labels, s)
        assert g.evals_per_call == (1 if s == 1.0 else 2)
        eps_c, eps_u = m(x, t, labels), m(x, t)
        torch.testing.assert_close(g(x, t), eps_u + s * (eps_c - eps_u), rtol=1e-12, atol=1e-12)


def test_head_combination_misses_exactly_the_cross_jacobian_term():
    """d/dgamma of eps_g = eps_u + s (eps_c - eps_u) along the guided ODE equals the linear
    combination of each branch's own-ODE derivative plus s (s-1) (J_c - J_u) (eps_c - eps_u) / sqrt(1+g^2)."""
    m = _mixture()
    sched = m.schedule
    x, t = _points()
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    null = torch.full_like(labels, m.num_classes)
    for s in (1.5, 3.0):
        g = Conditioned(m, labels, s)
        eps_g, head_g = g.eps_and_head(x, t)
        gamma = sched.gamma(t).view(-1, 1, 1, 1)
        from genie_fast.ops import head_combine_ref
        combo = head_combine_ref(head_g, gamma)
        # exact derivative of the guided eps along the guided trajectory
        from genie_fast.solvers import exact_deps
        exact = exact_deps(g, x, t, eps_g, sched)
        # the cross term, with the branches' Jacobians applied to delta = eps_c - eps_u
        delta = m(x, t, labels) - m(x, t)
        jc = torch.func.jvp(lambda x_: m(x_, t, labels), (x,), (delta,))[1]
        ju = torch.func.jvp(lambda x_: m(x_, t, null), (x,), (delta,))[1]
        term = s * (s - 1) * (jc - ju) / torch.sqrt(1 + gamma * gamma)
        torch.testing.assert_close(exact, combo + term, rtol=1e-9, atol=1e-9)
        assert term.norm() > 1e-3 * exact.norm()  # the term is really there on this mixture


def test_unguided_conditioned_is_the_plain_conditional_model():
    m = _mixture()
    x, t = _points()
    labels = torch.tensor([1, 1, 0, 0, 1, 0])
    c = conditioned(m, labels, 1.0, batch=6)
    torch.testing.assert_close(c(x, t), m(x, t, labels))
    e, h = c.eps_and_head(x, t)
    e2, h2 = m.eps_and_head(x, t, labels)
    torch.testing.assert_close(h, h2)


def test_update_changes_labels_and_scale_in_place():
    m = _mixture()
    x, t = _points()
    g = Conditioned(m, torch.zeros(6, dtype=torch.long), 2.0)
    buf = g.labels
    g.update(torch.ones(6, dtype=torch.long), 3.0)
    assert g.labels is buf and float(g.scale) == 3.0
    eps_c, eps_u = m(x, t, torch.ones(6, dtype=torch.long)), m(x, t)
    torch.testing.assert_close(g(x, t), eps_u + 3.0 * (eps_c - eps_u))
    with pytest.raises(ValueError, match="guided and unguided"):
        g.update(torch.ones(6, dtype=torch.long), 1.0)


def test_labels_are_checked():
    assert check_labels(3, 4, 10).tolist() == [3, 3, 3, 3]
    assert check_labels([1, 2], 2, 10).dtype == torch.long
    with pytest.raises(ValueError, match="not class-conditional"):
        check_labels(1, 2, 0)
    with pytest.raises(ValueError, match=r"0\.\.9"):
        check_labels(11, 2, 10)
    with pytest.raises(ValueError, match="shape"):
        check_labels([1, 2, 3], 2, 10)
    with pytest.raises(TypeError, match="integers"):
        check_labels(torch.tensor([0.5, 1.0]), 2, 10)
    with pytest.raises(ValueError, match="needs labels"):
        conditioned(_mixture(), None, 2.0, batch=2)
    with pytest.raises(ValueError, match="guidance_scale"):
        conditioned(_mixture(), 1, math.nan, batch=2)
    assert conditioned(_mixture(), None, None, batch=2).__class__.__name__ == "GaussianMixture"


# --------------------------------------------------------------------------- through sample() / encode()

def _class_data(m, labels, seed=0):
    """Draws of each label's own components (so encoding along that label's ODE is well posed)."""
    g = torch.Generator().manual_seed(seed)
    x = m.sample_data(64 * len(labels), g)
    # keep, for each label, a draw whose nearest mean belongs to that label's class
    d = ((x.flatten(1)[:, None] - m.means[None]) ** 2).sum(-1)
    cls = m.classes[d.argmin(1)]
    return torch.stack([x[(cls == int(lab)).nonzero()[i, 0]] for i, lab in enumerate(labels)])


def test_sample_with_labels_counts_two_evaluations_per_guided_step():
    import genie_fast
    from genie_fast.solvers import SOLVERS

    m = _mixture()
    noise = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    x, nfe = genie_fast.sample(m, noise=noise, solver="genie", steps=5, afs=False, grid="logsnr",
                               labels=labels, guidance_scale=2.0, dtype=torch.float64)
    assert nfe == 10  # 5 steps x 2 branches (one batched call each)
    ref, calls = SOLVERS["genie"](Conditioned(m, labels, 2.0), noise, genie_fast.time_grid(m.schedule, 5, "logsnr"),
                                  m.schedule, afs=False)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-12)
    _, nfe = genie_fast.sample(m, noise=noise, solver="genie", nfe=10, labels=labels, guidance_scale=2.0,
                               dtype=torch.float64)
    assert nfe == 10  # a budget of 10 evaluations: AFS step free, then 5 guided steps
    _, nfe = genie_fast.sample(m, noise=noise, solver="genie", steps=5, afs=False, labels=labels,
                               guidance_scale=1.0, dtype=torch.float64)
    assert nfe == 5   # s = 1: the conditional branch alone


def test_new_labels_and_scale_reuse_the_engine_and_give_fresh_results():
    import genie_fast
    from genie_fast.engine import engine_for
    from genie_fast.sampling import _with_labels

    m = _mixture()
    noise = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a = _with_labels(m, torch.tensor([0, 0, 1, 1]), 2.0, 4)
    b = _with_labels(m, torch.tensor([1, 1, 0, 0]), 3.0, 4)
    assert a is b  # one wrapper (and so one engine and its graphs) per model and batch
    x1, _ = genie_fast.sample(m, noise=noise, solver="dpmpp_2m", steps=6, labels=[1, 0, 1, 0], guidance_scale=3.0,
                              dtype=torch.float64)
    x2, _ = genie_fast.sample(Conditioned(m, torch.tensor([1, 0, 1, 0]), 3.0), noise=noise, solver="dpmpp_2m",
                              steps=6, dtype=torch.float64)
    torch.testing.assert_close(x1, x2, rtol=0, atol=1e-12)
    assert engine_for(a, "cpu") is engine_for(b, "cpu")


def test_guided_genie_with_afs_converges_to_the_guided_ode():
    """GENIE with each branch's exact head, AFS on: the error against a fine DPM-Solver++ solution of the
    guided ODE falls with the steps (the missing cross term limits it to first order, measured here)."""
    import genie_fast

    m = _mixture()
    noise = torch.randn(16, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    labels = torch.arange(16) % 2
    kw = dict(labels=labels, guidance_scale=2.0, dtype=torch.float64, grid="logsnr")
    ref, _ = genie_fast.sample(m, noise=noise, solver="dpmpp_2m", steps=800, afs=False, **kw)
    errs = [float((genie_fast.sample(m, noise=noise, solver="genie", steps=s, afs=True, **kw)[0] - ref).norm())
            for s in (8, 16, 32)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[1] / errs[2] > 1.7  # at least first order


def test_encode_decode_round_trip_with_labels():
    import genie_fast

    m = _mixture()
    labels = torch.tensor([0, 1, 0, 1])
    x0 = _class_data(m, labels)
    errs = []
    for steps in (20, 80):
        xT, nfe = genie_fast.encode(m, x0, solver="dpmpp_2m", steps=steps, labels=labels, guidance_scale=1.5,
                                    dtype=torch.float64)
        assert nfe == 2 * steps
        back, _ = genie_fast.sample(m, noise=xT, solver="dpmpp_2m", steps=steps, afs=False, labels=labels,
                                    guidance_scale=1.5, dtype=torch.float64)
        errs.append(float((back - x0).abs().max()))
    assert errs[1] < errs[0] / 8 and errs[1] < 1e-2  # (at least) second order


def test_encode_refuses_afs_and_labels_need_a_conditional_model():
    import genie_fast
    from genie_fast.engine import engine_for

    m = _mixture()
    x0 = m.sample_data(2)
    for bad in (dict(afs=True), dict(denoise=True)):
        with pytest.raises(ValueError, match="AFS and the denoising step do not apply"):
            genie_fast.encode(m, x0, steps=4, dtype=torch.float64, **bad)
    xT, _ = engine_for(m, "cpu").encode(x0, steps=3, dtype=torch.float64, grid=[1.0, 0.5, 0.1, 1e-3])
    xT2, _ = genie_fast.encode(m, x0, dtype=torch.float64, grid=[1e-3, 0.1, 0.5, 1.0])
    torch.testing.assert_close(xT, xT2, rtol=0, atol=0)  # an explicit grid either way round
    plain = GaussianMixture.random(2, SHAPE, seed=1).double()
    with pytest.raises(ValueError, match="not class-conditional"):
        genie_fast.sample(plain, n=2, labels=1)
    with pytest.raises(ValueError, match="needs labels"):
        genie_fast.sample(m, n=2, guidance_scale=2.0)


def test_encode_warns_for_ipndm_below_its_step_floor():
    import warnings

    import genie_fast
    from genie_fast.engine import IPNDM_MIN_ENCODE_STEPS

    m = _mixture()
    x0 = m.sample_data(2)
    with pytest.warns(UserWarning, match=f"ipndm with 10 steps.*{IPNDM_MIN_ENCODE_STEPS} steps or more"):
        genie_fast.encode(m, x0, solver="ipndm", steps=10, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        genie_fast.encode(m, x0, solver="ipndm", steps=IPNDM_MIN_ENCODE_STEPS, dtype=torch.float64)
        genie_fast.encode(m, x0, solver="dpmpp_2m", steps=10, dtype=torch.float64)


def test_cli_sample_with_labels_and_encode_with_reconstruction(tmp_path, capsys):
    import matplotlib.image
    from safetensors.torch import load_file

    from _helpers import randomize
    from genie_fast.cli import main, save_grid
    from genie_fast.models.default import save_model
    from genie_fast.models.head import GenieModel
    from genie_fast.models.unet import UNet

    torch.manual_seed(0)
    model = randomize(GenieModel(UNet("tiny_cond")), 0.05)
    stem = save_model(model, tmp_path / "m")
    assert main(["sample", "--model", str(stem), "--labels", "0,3", "--guidance-scale", "2", "--n", "3",
                 "--steps", "2", "--out", str(tmp_path / "g.png")]) == 0
    out = capsys.readouterr().out
    assert "6 samples" in out and "2 NFE per sample" in out  # 2 steps: the AFS step is free, the guided one costs 2
    grid = matplotlib.image.imread(str(tmp_path / "g.png"))
    assert grid.shape[0] == 2 * (8 + 2) + 2 and grid.shape[1] == 3 * (8 + 2) + 2  # 2 rows of 3
    # encode two PNGs and reconstruct them
    imgs = torch.rand(2, 1, 8, 8) * 2 - 1
    for i in range(2):
        save_grid(imgs[i:i + 1], tmp_path / f"i{i}.png", pad=0)
    assert main(["encode", "--model", str(stem), "--images", str(tmp_path / "i0.png"), str(tmp_path / "i1.png"),
                 "--steps", "4", "--solver", "dpmpp_2m", "--labels", "1", "--out", str(tmp_path / "z.safetensors"),
                 "--reconstruct", str(tmp_path / "r.png")]) == 0
    z = load_file(str(tmp_path / "z.safetensors"))["latents"]
    assert z.shape == (2, 1, 8, 8) and torch.isfinite(z).all()
    assert "RMSE" in capsys.readouterr().out
    assert main(["encode", "--model", str(stem), "--out", str(tmp_path / "z.pt"), "--images",
                 str(tmp_path / "i0.png")]) == 2
    assert ".safetensors" in capsys.readouterr().err


def test_labels_are_one_cond_input_and_negative_labels_replace_the_null_class():
    """Issue 31: labels= is the input 'labels' of cond=; the negative branch defaults to the null
    class and negative_cond={'labels': ...} replaces it (eps = eps_neg + s (eps_c - eps_neg))."""
    import genie_fast

    m = _mixture()
    x, t = _points()
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    other = 1 - labels
    g = Conditioned(m, guidance_scale=2.5, cond={"labels": labels}, negative_cond={"labels": other})
    torch.testing.assert_close(g(x, t), m(x, t, other) + 2.5 * (m(x, t, labels) - m(x, t, other)),
                               rtol=1e-12, atol=1e-12)
    noise = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    kw = dict(noise=noise, solver="dpmpp_2m", steps=5, guidance_scale=2.0, dtype=torch.float64)
    a, nfe = genie_fast.sample(m, labels=labels, **kw)
    b, _ = genie_fast.sample(m, cond={"labels": labels}, **kw)
    c, _ = genie_fast.sample(m, labels=labels, negative_cond={"labels": torch.full_like(labels, m.num_classes)}, **kw)
    d, _ = genie_fast.sample(m, labels=labels, negative_cond={"labels": other}, **kw)
    assert torch.equal(a, b) and torch.equal(a, c) and not torch.allclose(a, d)
    assert nfe == (5 - 1) * 2  # AFS, then 4 guided evaluations
    with pytest.raises(ValueError, match="labels were given twice"):
        genie_fast.sample(m, labels=labels, cond={"labels": labels}, **kw)
    with pytest.raises(ValueError, match=r"labels must be in 0..1"):
        genie_fast.sample(m, labels=labels, negative_cond={"labels": labels + 5}, **kw)
