
import numpy as np
import pytest
import torch

from genie_fast.distill import head_loss, jvp_deps, ode_tangents
from genie_fast.models.head import GenieModel
from genie_fast.models.unet import UNet
from genie_fast.schedule import VPSchedule


def _random_unet(seed=0, std=0.2):
    m = UNet("tiny").double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)
    return m


def _rel(a, b):
    return ((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max().item()


@pytest.mark.parametrize("t", [[1e-3, 0.05, 0.3], [0.6, 0.9, 1.0]])
def test_jvp_target_matches_central_difference_along_ode(t):
    """d eps/d gamma from the JVP vs. central differences along the tangent of the ODE."""
    unet, s = _random_unet(), VPSchedule()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(t, dtype=torch.float64)
    eps, deps = jvp_deps(unet, x, t, s)
    dx, _ = ode_tangents(eps, x, t, s)
    gamma = s.gamma(t)
    errs = []
    for rel_step in (1e-3, 1e-4):
        d = rel_step * gamma
        d4 = d[:, None, None, None]
        fd = (unet(x + d4 * dx, s.t_of_gamma(gamma + d)) - unet(x - d4 * dx, s.t_of_gamma(gamma - d))) / (2 * d4)
        errs.append(_rel(fd, deps))
    # central differences converge as step^2: the error must shrink ~100x and end small
    assert errs[1] < 1e-4
    assert errs[1] < errs[0] / 30 or errs[0] < 1e-7


def test_jvp_target_matches_derivative_of_solved_trajectory():
    """Solve the ODE d x_bar/d gamma = eps (RK4, small steps) either side; differentiate eps along it."""
    unet, s = _random_unet(seed=3), VPSchedule()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.2, 0.7], dtype=torch.float64)
    gamma = s.gamma(t)
    _, deps = jvp_deps(unet, x, t, s)

    def f(xb, g):  # d x_bar / d gamma
        g4 = g[:, None, None, None]
        return unet(xb / torch.sqrt(1 + g4 * g4), s.t_of_gamma(g))

    def eps_after(delta, n=4):
        xb, g = x * torch.sqrt(1 + gamma[:, None, None, None] ** 2), gamma.clone()
        h = delta / n
        for _ in range(n):
            h4 = h[:, None, None, None]
            k1 = f(xb, g)
            k2 = f(xb + h4 / 2 * k1, g + h / 2)
            k3 = f(xb + h4 / 2 * k2, g + h / 2)
            k4 = f(xb + h4 * k3, g + h)
            xb, g = xb + h4 / 6 * (k1 + 2 * k2 + 2 * k3 + k4), g + h
        return f(xb, g)

    errs = []
    for rel_step in (1e-4, 1e-5):
        d = rel_step * gamma
        fd = (eps_after(d) - eps_after(-d)) / (2 * d[:, None, None, None])
        errs.append(_rel(fd, deps))
    # second-order convergence of the central difference towards the JVP
    assert errs[1] < 1e-5 and errs[1] < errs[0] / 30


def test_tangent_is_ode_velocity():
    s = VPSchedule()
    x, eps, t = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.tensor([0.1, 0.8])
    dx, dt = ode_tangents(eps, x, t, s)
    g = s.gamma(t)[:, None, None, None]
    # x = x_bar / sqrt(1+g^2) with d x_bar/d gamma = eps
    torch.testing.assert_close(dx, eps / torch.sqrt(1 + g**2) - x * g / (1 + g**2))
    torch.testing.assert_close(dt, s.dt_dgamma(s.gamma(t)))


def test_head_loss_decreases():
    torch.manual_seed(0)
    unet = _random_unet(std=0.1).float()
    model = GenieModel(unet)
    for p in unet.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(model.head.parameters(), lr=3e-3)
    x = torch.randn(8, 1, 8, 8)
    t = torch.linspace(0.05, 1.0, 8)
    first = None
    for _ in range(40):
        loss, rel = head_loss(model, x, t)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    assert all(p.grad is None for p in unet.parameters())


from _helpers import write_idx as _write_idx


def test_train_distill_export_end_to_end(tmp_path):
    from genie_fast.cli import main
    from genie_fast.models.default import load_model

    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (16, 28, 28)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, (16,)))
    common = ["--data-root", str(tmp_path), "--batch", "4", "--threads", "1", "--log-every", "1"]
    assert main(["train", "--config", "tiny", "--out", str(tmp_path / "tr"), "--steps", "2", *common]) == 0
    assert main(["train", "--out", str(tmp_path / "tr"), "--steps", "3", "--resume", *common]) == 0
    log = (tmp_path / "tr" / "log.txt").read_text()
    assert "step 3 loss" in log and "# start step=2" in log
    assert main(["distill", "--unet-ckpt", str(tmp_path / "tr" / "ckpt.pt"), "--out", str(tmp_path / "di"),
                 "--steps", "2", *common]) == 0
    assert "rel_err" in (tmp_path / "di" / "log.txt").read_text()
    assert main(["export", "--unet-ckpt", str(tmp_path / "tr" / "ckpt.pt"), "--head-ckpt",
                 str(tmp_path / "di" / "ckpt.pt"), "--out", str(tmp_path / "m"), "--provenance", '{"a": 1}',
                 "--head-error", "0.5"]) == 0
    m = load_model(tmp_path / "m")
    assert m.provenance == {"a": 1} and m.head_error == 0.5
    assert main(["export", "--unet-ckpt", str(tmp_path / "tr" / "ckpt.pt"), "--head-ckpt",
                 str(tmp_path / "di" / "ckpt.pt"), "--out", str(tmp_path / "m_bad"), "--head-error", "nan"]) == 2
    eps, deps = m.eps_and_deps(torch.randn(1, 1, 32, 32), torch.tensor([0.5]))
    assert torch.isfinite(deps).all()
    # the benchmarks' --unet-ckpt: a saved head on the EMA network of one run's states, or their average
    from genie_fast.distill import load_unet_from_train_ckpt, with_trained_unet
    assert main(["train", "--config", "tiny", "--out", str(tmp_path / "tr2"), "--steps", "1", "--seed", "1",
                 *common]) == 0
    a, b = (str(tmp_path / d / "ckpt.pt") for d in ("tr", "tr2"))
    ua, ub = load_unet_from_train_ckpt(a).state_dict(), load_unet_from_train_ckpt(b).state_dict()
    avg = with_trained_unet(tmp_path / "m", f"{a},{b}")
    assert avg.provenance["unet_ckpt"] == [a, b] and avg.head is not None
    for k, v in avg.unet.state_dict().items():
        assert torch.allclose(v, (ua[k] + ub[k]) / 2, atol=1e-7), k
    assert any(not torch.equal(ua[k], ub[k]) for k in ua)  # two different networks were averaged
    assert all(torch.equal(v, ua[k]) for k, v in with_trained_unet(tmp_path / "m", a).unet.state_dict().items())
    assert with_trained_unet(tmp_path / "m").provenance == {"a": 1}  # no checkpoint: the saved model
    for ckpts in (a, f"{a},{b}"):  # the bundled model's head reads another network
        with pytest.raises(ValueError, match="not the saved model's"):
            with_trained_unet(None, ckpts)
    with pytest.raises(ValueError, match="no checkpoint"):
        with_trained_unet(tmp_path / "m", ",")
    # distill and export take the same average (the bundled network is one)
    assert main(["export", "--unet-ckpt", f"{a},{b}", "--head-ckpt", str(tmp_path / "di" / "ckpt.pt"),
                 "--out", str(tmp_path / "m_avg")]) == 0
    exported = load_model(tmp_path / "m_avg").unet.state_dict()
    assert all(torch.equal(v, exported[k]) for k, v in avg.unet.state_dict().items())
    assert main(["distill", "--unet-ckpt", f"{a},{b}", "--out", str(tmp_path / "di2"), "--steps", "1", *common]) == 0
    assert main(["train", "--config", "tiny_cond", "--out", str(tmp_path / "tr3"), "--steps", "1", *common]) == 0
    with pytest.raises(ValueError, match="only states of one network average"):
        load_unet_from_train_ckpt(f"{a},{tmp_path / 'tr3' / 'ckpt.pt'}")
    assert main(["train", "--out", str(tmp_path / "tr"), "--data-root", str(tmp_path / "none"),
                 "--steps", "4", "--resume"]) == 2


def test_keep_at_keeps_states_a_shorter_run_remakes(tmp_path):
    """--keep-at copies the state at those steps aside; the same command with --steps N remakes the
    step-N state exactly (how a weight average of one run's states is remade)."""
    from genie_fast.cli import main
    from genie_fast.train import load_checkpoint

    rng = np.random.default_rng(2)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (8, 28, 28)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, (8,)))
    common = ["--config", "tiny", "--data-root", str(tmp_path), "--batch", "4", "--threads", "1", "--lr", "1e-2"]
    assert main(["train", "--out", str(tmp_path / "a"), "--steps", "4", "--keep-at", "1,3", *common]) == 0
    assert main(["train", "--out", str(tmp_path / "b"), "--steps", "3", *common]) == 0
    kept = {n: load_checkpoint(tmp_path / "a" / f"ckpt_step{n}.pt") for n in (1, 3)}
    assert [kept[n]["step"] for n in (1, 3)] == [1, 3] and not (tmp_path / "a" / "ckpt_step2.pt").exists()
    short = load_checkpoint(tmp_path / "b" / "ckpt.pt")
    assert all(torch.equal(v, short["ema"][k]) for k, v in kept[3]["ema"].items())
    assert any(not torch.equal(v, short["ema"][k]) for k, v in kept[1]["ema"].items())
    for bad in ("0", "5", "x"):
        assert main(["train", "--out", str(tmp_path / "c"), "--steps", "4", "--keep-at", bad, *common]) == 2


def test_train_init_from(tmp_path, capsys):
    from genie_fast.cli import main
    from genie_fast.train import load_checkpoint

    rng = np.random.default_rng(1)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (8, 28, 28)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, (8,)))
    common = ["--data-root", str(tmp_path), "--batch", "4", "--threads", "1", "--lr", "0"]
    assert main(["train", "--config", "tiny", "--out", str(tmp_path / "a"), "--steps", "1", *common,
                 "--lr", "1e-2"]) == 0
    src = load_checkpoint(tmp_path / "a" / "ckpt.pt")
    # Same architecture: the EMA weights carry over (lr 0 keeps them), the step restarts.
    tiny_b = tmp_path / "b"
    assert main(["train", "--config", "tiny", "--out", str(tiny_b), "--steps", "1", *common,
                 "--init-from", str(tmp_path / "a" / "ckpt.pt")]) == 0
    dst = load_checkpoint(tiny_b / "ckpt.pt")
    assert dst["step"] == 1
    assert all(torch.equal(dst["model"][k], v) for k, v in src["ema"].items())
    assert "initialised from" in capsys.readouterr().out
    # Another architecture is refused with a message that names the mismatch.
    assert main(["train", "--config", "fmnist_small", "--out", str(tmp_path / "c"), "--steps", "1", *common,
                 "--init-from", str(tmp_path / "a" / "ckpt.pt")]) == 2
    assert "other parameters than this config" in capsys.readouterr().err


# --------------------------------------------------------------------------- the secant target

def _mixture_point(t, seed=5):
    """A 4-mode mixture (exact eps, float64) and x_t ~ q(x_t | x_0) at the times t."""
    from genie_fast.models.gmm import GaussianMixture
    from genie_fast.schedule import q_sample
    gmm = GaussianMixture.random(4, (1, 4, 4), seed=seed, spread=1.0)
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor(t, dtype=torch.float64)
    x, _, _ = q_sample(gmm.sample_data(len(t), g), gmm.schedule, g, t=t)
    return gmm, x, t


def test_secant_target_converges_to_the_jvp_as_span_squared():
    """Inside the time range the secant along the ODE (Euler steps to t +- span/2) differs from the
    exact d eps/d gamma by O(span^2): halving the span quarters the error."""
    from genie_fast.distill import secant_deps
    gmm, x, t = _mixture_point([0.15, 0.4, 0.7, 0.9])
    exact = gmm.exact_deps(x, t)
    eps = gmm(x, t)
    errs = []
    for span in (0.04, 0.02, 0.01, 0.005):
        e, deps = secant_deps(gmm, x, t, gmm.schedule, span)
        assert torch.equal(e, eps)
        errs.append(_rel(deps, exact))
    ratios = [a / b for a, b in zip(errs, errs[1:])]
    assert all(3.3 < r < 4.7 for r in ratios), (errs, ratios)
    assert errs[-1] < 2e-3
    # eps given: the same secant, from the two off-centre evaluations only
    calls = []
    _, deps_given = secant_deps(lambda x_, t_: calls.append(1) or gmm(x_, t_), x, t, gmm.schedule, 0.005, eps=eps)
    assert len(calls) == 2
    torch.testing.assert_close(deps_given, deps, rtol=0, atol=0)


def test_secant_target_at_the_ends_is_one_sided_and_converges():
    """At t = 1 and t = t_end the window is shifted inside [t_end, 1] (one-sided): first order."""
    from genie_fast.distill import secant_deps, secant_times
    gmm, x, t = _mixture_point([1.0, 1e-3])
    lo, hi = secant_times(t, 0.02, gmm.schedule)
    torch.testing.assert_close(hi - lo, torch.full_like(t, 0.02))
    assert float(hi[0]) == 1.0 and float(lo[1]) == gmm.schedule.t_end
    exact = gmm.exact_deps(x, t)
    errs = [((secant_deps(gmm, x, t, gmm.schedule, s)[1] - exact).flatten(1).norm(dim=1)
             / exact.flatten(1).norm(dim=1)) for s in (2e-3, 1e-3, 5e-4)]
    for a, b in zip(errs, errs[1:]):
        assert bool(((a / b > 1.6) & (a / b < 2.6)).all()), errs
    assert float(errs[-1].max()) < 0.05


def test_secant_head_loss_and_bad_arguments():
    from genie_fast.distill import distill_target, secant_deps
    gmm, x, t = _mixture_point([0.3, 0.6])
    for bad in (0, 0.0, -0.01, 1.0, float("nan"), float("inf"), True, "0.01", None):
        with pytest.raises(ValueError, match="span_t"):
            secant_deps(gmm, x, t, gmm.schedule, bad)
    with pytest.raises(ValueError, match="span_t applies to the secant target only"):
        distill_target(gmm, x, t, gmm.schedule, "jvp", span_t=0.01)
    with pytest.raises(ValueError, match="target must be one of"):
        distill_target(gmm, x, t, gmm.schedule, "central")
    # the largest span that fits: the whole range, one window for every t
    from genie_fast.distill import secant_times
    whole = 1.0 - gmm.schedule.t_end
    lo, hi = secant_times(t, whole, gmm.schedule)
    assert lo.tolist() == pytest.approx([gmm.schedule.t_end] * 2, abs=1e-15) and hi.tolist() == [1.0] * 2
    _, deps = distill_target(gmm, x, t, gmm.schedule, "secant", span_t=whole)
    assert bool(torch.isfinite(deps).all())
    # head_loss trains against the secant when asked
    torch.manual_seed(0)
    unet = _random_unet(std=0.1).float()
    model = GenieModel(unet)
    for p in unet.parameters():
        p.requires_grad_(False)
    xb, tb = torch.randn(4, 1, 8, 8), torch.tensor([0.1, 0.4, 0.7, 1.0])
    loss_j, _ = head_loss(model, xb, tb)
    loss_s, rel_s = head_loss(model, xb, tb, target="secant", span_t=0.01)
    assert loss_s.requires_grad and float(loss_s) != float(loss_j) and 0 < float(rel_s)


def test_distill_cli_target_arguments(tmp_path, capsys):
    from genie_fast.cli import main
    base = ["distill", "--unet-ckpt", str(tmp_path / "none.pt"), "--out", str(tmp_path / "run"), "--steps", "1"]
    assert main([*base, "--span-t", "0.01"]) == 2  # the bundled U-Net's default target is the JVP
    assert "--span-t" in capsys.readouterr().err
    for bad in ("0", "-1", "1", "nan"):
        assert main([*base, "--target", "secant", "--span-t", bad]) == 2
        assert "--span-t" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit):
        main([*base, "--target", "central"])
