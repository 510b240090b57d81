"""The exact-score Gaussian mixture and the float64 reference ODE solution."""
import math

import pytest
import torch

from genie_fast.models import GaussianMixture
from genie_fast.reference import reference_solution
from genie_fast.schedule import DiscreteVPSchedule, VPSchedule


pytestmark = pytest.mark.usefixtures("one_thread")


def _eps_by_autograd(gmm: GaussianMixture, x, t_cont):
    """-sigma * grad_x log p_t(x), the density written out independently of the closed form."""
    s = gmm.schedule
    alpha, sigma = s.alpha(t_cont), s.sigma(t_cont)
    x = x.detach().flatten(1).requires_grad_(True)
    mean = alpha[:, None, None] * gmm.means[None]                                   # (B, K, D)
    var = alpha[:, None, None] ** 2 * gmm.variances[None] + sigma[:, None, None] ** 2
    comp = torch.distributions.Normal(mean, var.sqrt()).log_prob(x[:, None]).sum(-1)  # (B, K)
    log_p = torch.logsumexp(comp + gmm.log_weights[None], dim=1)
    (score,) = torch.autograd.grad(log_p.sum(), x)
    return -sigma[:, None] * score


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 5, 7)])
@pytest.mark.parametrize("diagonal", [False, True])
def test_eps_matches_autograd_score(shape, diagonal):
    gmm = GaussianMixture.random(5, shape, seed=1, diagonal=diagonal)
    g = torch.Generator().manual_seed(2)
    for t in (1e-3, 0.05, 0.3, 1.0):
        t_cont = torch.full((6,), t, dtype=torch.float64)
        # points drawn from the diffused mixture itself, where p_t is not negligible
        x0 = gmm.sample_data(6, generator=g)
        x = gmm.schedule.alpha(t) * x0 + gmm.schedule.sigma(t) * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        got = gmm(x, t_cont)
        want = _eps_by_autograd(gmm, x, t_cont).view_as(x)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_eps_stable_far_from_the_data():
    # far from every mode at small t the densities underflow; the log-sum-exp must not
    gmm = GaussianMixture.random(3, (1, 4, 4), seed=0, std_range=(0.01, 0.02))
    x = torch.full((2, 1, 4, 4), 50.0, dtype=torch.float64)
    for t in (1e-3, 1.0):
        eps = gmm(x, torch.full((2,), t, dtype=torch.float64))
        assert torch.isfinite(eps).all()
    # float32 too: the nearest component wins
    eps32 = gmm(x.float(), torch.full((2,), 1e-3))
    assert torch.isfinite(eps32).all() and eps32.dtype == torch.float32


def test_discrete_schedule_time_input():
    sched = DiscreteVPSchedule.cosine()
    gmm = GaussianMixture.random(3, (2, 3, 3), seed=4, schedule=sched)
    t_cont = torch.tensor([0.01, 0.2, 0.5, 0.93], dtype=torch.float64)
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = gmm(x, sched.model_time(t_cont))  # models receive the step index
    torch.testing.assert_close(got, _eps_by_autograd(gmm, x, t_cont).view_as(x), rtol=1e-9, atol=1e-10)


def test_exact_deps_matches_finite_differences():
    """Central differences along the ODE's tangent line: the path's O(d^2) error cancels."""
    gmm = GaussianMixture.random(4, (1, 4, 4), seed=3)
    s = gmm.schedule
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for t in (0.02, 0.2, 0.7):
        tt = torch.full((5,), t, dtype=torch.float64)
        gamma = s.gamma(t)
        eps = gmm(x, tt)
        x_bar = x * math.sqrt(1 + gamma**2)
        d = 1e-4 * gamma

        def eps_at(sign):
            g = gamma + sign * d
            t_g = torch.full((5,), s.t_of_gamma(g), dtype=torch.float64)
            return gmm((x_bar + sign * d * eps) / math.sqrt(1 + g * g), t_g)

        fd = (eps_at(1) - eps_at(-1)) / (2 * d)
        deps = gmm.exact_deps(x, tt)
        scale = deps.abs().max()
        assert (deps - fd).abs().max() <= 1e-6 * scale, (t, float((deps - fd).abs().max()), float(scale))


def test_single_gaussian_ode_solution_solves_the_ode():
    gmm = GaussianMixture.random(1, (3, 4, 4), seed=5, diagonal=True)
    s = gmm.schedule
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    # d x_bar / d gamma = eps along the closed form, by central differences
    for t in (0.01, 0.3, 0.9):
        gamma = s.gamma(t)
        x_t = gmm.ode_solution(x, 1.0, t)
        d = 1e-5 * gamma
        bar = lambda g: gmm.ode_solution(x, 1.0, s.t_of_gamma(g)) * math.sqrt(1 + g * g)  # noqa: E731
        slope = (bar(gamma + d) - bar(gamma - d)) / (2 * d)
        eps = gmm(x_t, torch.full((3,), t, dtype=torch.float64))
        torch.testing.assert_close(slope, eps, rtol=1e-6, atol=1e-8)
    # starting point maps to itself
    torch.testing.assert_close(gmm.ode_solution(x, 1.0, 1.0), x, rtol=0, atol=1e-14)


def test_reference_solution_against_closed_form():
    gmm = GaussianMixture.random(1, (1, 6, 6), seed=6, diagonal=True, std_range=(0.05, 0.5))
    x = torch.randn(8, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref = reference_solution(gmm, x, tol=1e-9)
    exact = gmm.ode_solution(x, 1.0, gmm.schedule.t_end)
    actual = float((ref.x - exact).abs().max())
    assert ref.err <= 1e-9
    # the self-consistency estimate is a real estimate: within a small factor of the true error
    assert actual <= 3 * ref.err + 1e-13, (actual, ref.err)
    assert ref.x.dtype == torch.float64 and ref.x.shape == x.shape


def test_reference_solution_refuses_an_unreachable_tolerance():
    gmm = GaussianMixture.random(3, (1, 4, 4), seed=0)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="did not reach tol"):
        reference_solution(gmm, x, tol=1e-14, steps=4, max_steps=16)
    with pytest.raises(ValueError, match="t_end"):
        reference_solution(gmm, x, t_end=2.0)


def test_sample_data_moments():
    gmm = GaussianMixture(torch.tensor([[[1.0, -2.0]]]), torch.tensor([0.5]))
    x0 = gmm.sample_data(20000, generator=torch.Generator().manual_seed(0))
    assert x0.shape == (20000, 1, 2)
    torch.testing.assert_close(x0.mean(0), torch.tensor([[1.0, -2.0]], dtype=torch.float64), atol=0.02, rtol=0)
    torch.testing.assert_close(x0.std(0), torch.full((1, 2), 0.5, dtype=torch.float64), atol=0.02, rtol=0)


def test_bad_arguments():
    means = torch.zeros(2, 1, 3, 3)
    with pytest.raises(ValueError, match="stds must have shape"):
        GaussianMixture(means, torch.ones(3))
    with pytest.raises(ValueError, match="std must be > 0"):
        GaussianMixture(means, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(means, torch.ones(2), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="means must have shape"):
        GaussianMixture(torch.zeros(3), torch.ones(3))
    gmm = GaussianMixture(means, torch.ones(2))
    with pytest.raises(ValueError, match="x must have shape"):
        gmm(torch.zeros(4, 1, 3, 4), torch.ones(4))
    with pytest.raises(ValueError, match="t must have shape"):
        gmm(torch.zeros(4, 1, 3, 3), torch.ones(3))
    with pytest.raises(ValueError, match="one component"):
        gmm.ode_solution(torch.zeros(1, 1, 3, 3), 1.0, 0.5)
    assert isinstance(gmm.schedule, VPSchedule) and gmm.image_shape == (1, 3, 3)
