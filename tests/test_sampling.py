"""genie_fast.sample: budgets, seeds, defaults and argument errors."""
import pytest
import torch

import genie_fast
from genie_fast import models
from genie_fast.models import GaussianMixture
from genie_fast.sampling import make_noise
from genie_fast.schedule import DiscreteVPSchedule, VPSchedule, time_grid
from _helpers import exact_head_kw as _kw
from genie_fast.solvers import NFE_PER_STEP, SOLVERS, DEFAULT_AFS, grid_for, nfe_of, steps_for_nfe

SHAPE = (1, 4, 4)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gmm():
    return GaussianMixture.random(3, SHAPE, seed=0)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_a_sample_does_not_depend_on_its_batch(gmm, name):
    a, _ = genie_fast.sample(gmm, seeds=[5, 6, 7], solver=name, nfe=6, **_kw(name, gmm))
    b, _ = genie_fast.sample(gmm, seeds=[2, 3, 4, 5, 6, 7], solver=name, nfe=6, **_kw(name, gmm))
    # a per-image seed's sample is the same in any batch (the GMM's eps is computed per sample exactly)
    torch.testing.assert_close(a, b[3:], rtol=0, atol=0)
    assert not torch.allclose(b[0], b[1])
    # a batch seed's first sample is that per-image seed's
    c, _ = genie_fast.sample(gmm, n=2, seed=5, solver=name, nfe=6, **_kw(name, gmm))
    torch.testing.assert_close(c[:1], a[:1], rtol=0, atol=0)


def test_noise_is_per_sample_and_seeds_select_disjoint_batches():
    from genie_fast.sampling import seed_noise

    g = torch.Generator().manual_seed(7)  # batch seed s: one generator seeded s, sample after sample
    torch.testing.assert_close(make_noise(2, (3, 5), seed=7), torch.stack([torch.randn(3, 5, generator=g)
                                                                          for _ in range(2)]), rtol=0, atol=0)
    torch.testing.assert_close(make_noise(2, (3, 5), seed=0), make_noise(5, (3, 5), seed=0)[:2], rtol=0, atol=0)
    a, b = make_noise(8, (3, 5), seed=0), make_noise(8, (3, 5), seed=1)
    assert not any(torch.equal(x, y) for x in a for y in b)  # seed=0 and seed=1 share no sample
    torch.testing.assert_close(seed_noise([9, 4], (3, 5))[1], make_noise(1, (3, 5), seed=4)[0], rtol=0, atol=0)
    for bad in (2**32, -1):  # torch keeps 32 bits of a seed: 2**32 would silently repeat seed 0
        with pytest.raises(ValueError, match="seed"):
            make_noise(1, (3, 5), seed=bad)
        with pytest.raises(ValueError, match="seeds"):
            seed_noise([bad], (3, 5))


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("afs", [False, True])
@pytest.mark.parametrize("denoise", [False, True])
def test_nfe_budget_is_spent_not_exceeded(gmm, name, afs, denoise):
    for budget in range(3, 13):
        steps = steps_for_nfe(name, budget, afs, denoise)
        if steps == 0 or nfe_of(name, steps, afs, denoise) == 0:  # one AFS step alone calls nothing
            with pytest.raises(ValueError, match="too small"):
                genie_fast.sample(gmm, n=1, solver=name, nfe=budget, afs=afs, denoise=denoise, **_kw(name, gmm))
            continue
        _, nfe = genie_fast.sample(gmm, n=1, solver=name, nfe=budget, afs=afs, denoise=denoise, **_kw(name, gmm))
        assert nfe == nfe_of(name, steps, afs, denoise) <= budget
        assert budget - nfe < NFE_PER_STEP[name]  # one more step would not have fit


def test_sample_is_the_solver_on_the_same_grid(gmm):
    noise = make_noise(4, SHAPE, seed=1, dtype=torch.float64)
    got, nfe = genie_fast.sample(gmm, noise=noise, solver="heun", nfe=10, grid="logsnr", afs=True)
    want, nfe_direct = SOLVERS["heun"](gmm, noise, time_grid(gmm.schedule, 5, "logsnr"), gmm.schedule, afs=True)
    assert nfe == nfe_direct == 9
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got.dtype == torch.float64


def test_explicit_grid(gmm):
    ts = [1.0, 0.5, 0.1, 0.01, 0.001]
    out, nfe = genie_fast.sample(gmm, n=2, solver="dpmpp_3m", grid=ts)
    assert nfe == 4 and out.shape == (2, *SHAPE)  # an explicit grid of times: no AFS unless asked (issue 29)
    assert genie_fast.sample(gmm, n=2, solver="dpmpp_3m", grid=ts, afs=True)[1] == 3
    with pytest.raises(ValueError, match="needs 8 NFE"):
        genie_fast.sample(gmm, n=2, solver="heun", nfe=7, grid=ts, afs=False)
    _, nfe = genie_fast.sample(gmm, n=2, solver="heun", steps=4, grid=ts, afs=False)
    assert nfe == 8
    with pytest.raises(ValueError, match="strictly"):
        genie_fast.sample(gmm, n=2, solver="ddim", grid=[1.0, 0.5, 0.7])


def test_uses_the_models_schedule_and_shape():
    sched = DiscreteVPSchedule.cosine()
    m = GaussianMixture.random(2, (2, 3, 3), seed=1, schedule=sched)
    out, _ = genie_fast.sample(m, n=2, solver="dpmpp_2m", nfe=8, seed=4)
    noise = make_noise(2, (2, 3, 3), seed=4)
    steps = steps_for_nfe("dpmpp_2m", 8, DEFAULT_AFS)
    want, _ = SOLVERS["dpmpp_2m"](m, noise, time_grid(sched, steps, grid_for("dpmpp_2m")), sched, afs=DEFAULT_AFS)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_plain_callable_needs_a_shape_and_gets_vp():
    calls = []

    def eps(x, t):
        calls.append(t)
        return 0.5 * x

    with pytest.raises(ValueError, match="shape="):
        genie_fast.sample(eps, n=2, solver="ddim", nfe=4)
    out, nfe = genie_fast.sample(eps, n=2, shape=(3, 2, 2), solver="ddim", nfe=4, dtype=torch.float64, afs=False)
    assert out.shape == (2, 3, 2, 2) and out.dtype == torch.float64 and nfe == 4
    assert calls[0].shape == (2,) and float(calls[0][0]) == VPSchedule().t_start == 1.0


def test_default_model_hook(monkeypatch, gmm):
    monkeypatch.setattr(models, "load_default", lambda: gmm, raising=False)
    out, nfe = genie_fast.sample(n=2, solver="ddim", nfe=5)
    assert out.shape == (2, *SHAPE) and nfe == 5


def test_bad_arguments_are_clear_errors(gmm):
    with pytest.raises(ValueError, match="unknown solver 'euler'"):
        genie_fast.sample(gmm, n=1, solver="euler")
    with pytest.raises(ValueError, match="nfe=2 is too small for genie_exact"):
        genie_fast.sample(gmm, n=1, solver="genie_exact", nfe=2)
    with pytest.raises(ValueError, match="noise must have shape"):
        genie_fast.sample(gmm, noise=torch.zeros(2, 1, 5, 5), solver="ddim")
    with pytest.raises(ValueError, match="disagrees"):
        genie_fast.sample(gmm, noise=torch.zeros(2, *SHAPE), n=3, solver="ddim")
    with pytest.raises(ValueError, match="positive number of samples"):
        genie_fast.sample(gmm, solver="ddim")
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        genie_fast.sample(gmm, n=0, solver="ddim")
    with pytest.raises(TypeError, match="nfe must be an int >= 1, got 2.5"):
        genie_fast.sample(gmm, n=1, solver="ddim", nfe=2.5)
    with pytest.raises(TypeError, match="grid must be"):
        genie_fast.sample(gmm, n=1, solver="ddim", grid=3)
    with pytest.raises(ValueError, match="unknown time grid"):
        genie_fast.sample(gmm, n=1, solver="ddim", grid="cubic")
    with pytest.raises(TypeError, match="callable"):
        genie_fast.sample(42, n=1, shape=SHAPE)
    with pytest.raises(TypeError, match="genie needs d eps/d gamma"):
        genie_fast.sample(lambda x, t: gmm(x, t), n=1, shape=SHAPE, solver="genie")
