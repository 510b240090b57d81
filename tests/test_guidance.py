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
