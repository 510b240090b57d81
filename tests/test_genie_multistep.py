"""genie_multistep: its quadrature, its blend weight, its orders, its head paths and its arguments."""
import json
import math
import warnings

import pytest
import torch

from genie_fast.models import GaussianMixture
from genie_fast.reference import reference_solution
from genie_fast.schedule import time_grid
from genie_fast.solvers import (DEFAULT_HEAD_ERROR, _exp_integrals, _genie_multistep_weights,
                                _moment_weights, genie_multistep, head_weight, Plan)

SHAPE = (1, 4, 4)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mixture():
    mix = GaussianMixture.random(4, SHAPE, seed=0)
    x = torch.randn(16, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return mix, x, reference_solution(mix, x, tol=1e-9).x


def _rmse(a, b):
    return float((a - b).pow(2).mean().sqrt())


@pytest.mark.parametrize("h", [0.7, -0.4, 2.0])
@pytest.mark.parametrize("values,derivs", [((0,), (0,)), ((0, 1), ()), ((0, -1), (-1,)), ((0, 1, -1), ()),
                                           ((0, 1), (0,)), ((0, -1), (0, -1)), ((0, 1, 2, -1), ())])
def test_moment_weights_integrate_polynomials_exactly(values, derivs, h):
    """sum a_j p(tau_j) + sum b_j p'(tau_j) = int_0^h e^{-(h - tau)} p(tau) dtau for deg p < nodes,
    checked against Gauss-Legendre quadrature of the integral; one degree more is not exact."""
    taus = {0: 0.0, -1: h, 1: -0.8 * h, 2: -1.9 * h}  # node offsets (past points on the other side)
    w = _moment_weights(values, derivs, lambda j: taus[j] / h, h)
    gl_x, gl_w = (torch.tensor(v, dtype=torch.float64) for v in __import__("numpy").polynomial.legendre.leggauss(20))
    tau, wq = 0.5 * h * (gl_x + 1), 0.5 * h * gl_w

    def quad(k):  # exact integral of tau^k against the kernel, and what the weights give
        exact = float((wq * torch.exp(-(h - tau)) * tau ** k).sum())
        got = sum(c * (taus[j] ** k if what == "x0" else (k * taus[j] ** (k - 1) if k else 0.0))
                  for (j, what), c in w.items())
        return exact, got

    m = len(values) + len(derivs)
    for k in range(m):
        exact, got = quad(k)
        assert got == pytest.approx(exact, rel=1e-10, abs=1e-12), (k, got, exact)
    exact, got = quad(m)
    assert abs(got - exact) > 1e-8 * abs(h) ** (m + 1)
    assert _exp_integrals(h, 0)[0] == pytest.approx(sum(c for (j, what), c in w.items() if what == "x0"))


def test_head_weight():
    assert head_weight(0.3, 0.0) == 1.0                        # an exact head is used alone
    assert head_weight(2 * 0.55, 0.55) == pytest.approx(0.5)   # equal error estimates: half each
    assert head_weight(0.01, 0.55) < 1e-3                      # tiny steps: the history's secants win
    assert head_weight(-1.0, 0.55) == head_weight(1.0, 0.55)   # encoding steps (h < 0) alike


@pytest.mark.parametrize("order,head_error,band", [(3, 0.0, (2.5, 3.5)), (3, 0.55, (2.5, 3.5)),
                                                    (4, 0.0, (3.5, 4.7)), (4, 0.55, (3.5, 4.7))])
def test_order(mixture, order, head_error, band):
    """Both forms of a step have the same order, so any blend keeps it (exact head here)."""
    mix, x, exact = mixture
    errs = [_rmse(genie_multistep(mix, x, time_grid(mix.schedule, n, "quadratic"), mix.schedule, order=order,
                                  head_error=head_error)[0], exact) for n in (16, 32, 64, 128)]
    slopes = [math.log2(errs[i] / errs[i + 1]) for i in range(3)]
    assert all(band[0] <= s <= band[1] for s in slopes[1:]), (slopes, errs)


def test_head_paths_agree(mixture):
    """eps_and_head (raw [h1|h2|h3]), eps_and_deps and head= give the same samples."""
    mix, x, _ = mixture
    ts = time_grid(mix.schedule, 8, "logsnr")

    class Deps(torch.nn.Module):
        head_error = 0.0

        def forward(self, x, t):
            return mix(x, t)

        def eps_and_deps(self, x, t):
            return mix(x, t), mix.exact_deps(x, t)

    a, nfe_a = genie_multistep(mix, x, ts, mix.schedule, afs=True)
    b, _ = genie_multistep(Deps(), x, ts, mix.schedule, afs=True)
    c, _ = genie_multistep(lambda x, t: mix(x, t), x, ts, mix.schedule, afs=True, head_error=0.0,
                           head=lambda x, t, eps: mix.exact_deps(x, t))
    assert nfe_a == 7
    assert _rmse(a, b) < 1e-12 and _rmse(a, c) < 1e-12


def test_head_error_comes_from_the_model(mixture):
    mix, x, _ = mixture
    ts = time_grid(mix.schedule, 6, "logsnr")
    exact_head = genie_multistep(mix, x, ts, mix.schedule)[0]
    assert _rmse(exact_head, genie_multistep(mix, x, ts, mix.schedule, head_error=0.0)[0]) == 0
    blended = genie_multistep(mix, x, ts, mix.schedule, head_error=DEFAULT_HEAD_ERROR)[0]
    assert _rmse(exact_head, blended) > 1e-4


def test_weight_rows_use_each_history_slot_once():
    """Row m never weighs the slot the op is about to fill with point m by mistake: the weights of
    a step sum (over the x0 terms) to the step's I_0, and the corrector of row 0 is the identity."""
    mix = GaussianMixture.random(2, SHAPE, seed=0)
    plan = Plan(mix.schedule, time_grid(mix.schedule, 7, "logsnr"), 2, "cpu", torch.float64)
    lam = (-torch.log(plan.gammas)).tolist()
    for order in (3, 4):
        rows = _genie_multistep_weights(plan, order, 0.3, False)
        assert rows[0][:8] == [1.0] + [0.0] * 7
        for m, row in enumerate(rows):
            h = lam[m + 1] - lam[m]
            pred_x0 = row[9] + sum(row[11:14])
            assert pred_x0 == pytest.approx(_exp_integrals(h, 0)[0], rel=1e-12)
            assert row[8] == pytest.approx(math.exp(-h), rel=1e-12)
            if m:
                hc = lam[m] - lam[m - 1]
                assert row[1] + sum(row[3:6]) == pytest.approx(_exp_integrals(hc, 0)[0], rel=1e-12)
            assert row[16] == pytest.approx(1 / math.sqrt(1 + float(plan.gammas[m + 1]) ** 2))


def test_lower_order_final_changes_only_the_last_predictor():
    mix = GaussianMixture.random(2, SHAPE, seed=0)
    plan = Plan(mix.schedule, time_grid(mix.schedule, 6, "logsnr"), 2, "cpu", torch.float64)
    a = _genie_multistep_weights(plan, 3, 0.55, False)
    b = _genie_multistep_weights(plan, 3, 0.55, True)
    assert a[:-1] == b[:-1] and a[-1][:8] == b[-1][:8] and a[-1] != b[-1]
    assert b[-1][11:16] == [0.0] * 5  # no history in the last predictor


@pytest.mark.parametrize("kw,match", [(dict(order=2), "order"), (dict(order="3"), "order"),
                                      (dict(head_error=-0.1), "head_error"),
                                      (dict(head_error=float("nan")), "head_error"),
                                      (dict(head_error="big"), "head_error"),
                                      (dict(lower_order_final="yes"), "lower_order_final")])
def test_bad_arguments_are_clear_errors(mixture, kw, match):
    mix, x, _ = mixture
    with pytest.raises(ValueError, match=match):
        genie_multistep(mix, x, time_grid(mix.schedule, 4), mix.schedule, **kw)


def test_needs_a_head():
    mix = GaussianMixture.random(2, SHAPE, seed=0)
    x = torch.randn(2, *SHAPE, dtype=torch.float64)
    with pytest.raises(TypeError, match="d eps/d gamma"):
        genie_multistep(lambda x, t: mix(x, t), x, time_grid(mix.schedule, 4), mix.schedule)


@pytest.mark.parametrize("values,derivs,constant", [
    ((0,), (0,), -1 / 6), ((0, 1), (), -5 / 12),            # order-3 predictor: head and history forms
    ((0, -1), (-1,), -1 / 72), ((0, 1, -1), (), 1 / 24),     # order-3 corrector
    ((0, 1), (0,), -7 / 72), ((0, 1, 2), (), -3 / 8),        # order-4 predictor
    ((0, -1), (0, -1), -1 / 720), ((0, 1, 2, -1), (), 19 / 720)])  # order-4 corrector
def test_error_constants_of_docs_method(values, derivs, constant):
    """The local error (Q - I)[tau^m / m!] / h^(m+1) -> the constants of docs/method.md section 11."""
    node = {0: 0.0, 1: -1.0, 2: -2.0, -1: 1.0}
    m = len(values) + len(derivs)
    for h, tol in ((1e-2, 0.15), (1e-3, 0.015)):
        w = _moment_weights(values, derivs, node.get, h)
        q = sum(c * ((node[j] * h) ** m / math.factorial(m) if what == "x0"
                     else (node[j] * h) ** (m - 1) / math.factorial(m - 1)) for (j, what), c in w.items())
        got = (q - _exp_integrals(h, m)[m]) / h ** (m + 1)
        assert got == pytest.approx(constant, rel=tol), (h, got)


def test_head_error_of_a_head_callable(mixture):
    """A head= callable declares its own error (the model's figure is for the model's head); without
    one, genie_multistep warns and assumes DEFAULT_HEAD_ERROR."""
    mix, x, _ = mixture
    ts = time_grid(mix.schedule, 6, "logsnr")
    exact = genie_multistep(mix, x, ts, mix.schedule, head_error=0.0)[0]
    assumed = genie_multistep(mix, x, ts, mix.schedule, head_error=DEFAULT_HEAD_ERROR)[0]

    def head(x, t, eps):
        return mix.exact_deps(x, t)

    with pytest.warns(UserWarning, match="head_error"):
        plain = genie_multistep(mix, x, ts, mix.schedule, head=head)[0]
    assert _rmse(plain, assumed) < 1e-12  # not the mixture's own head_error = 0
    head.head_error = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        declared = genie_multistep(mix, x, ts, mix.schedule, head=head)[0]
    assert _rmse(declared, exact) < 1e-12


def test_saved_model_carries_its_head_error(tmp_path):
    """save_model writes head_error at the top of the JSON, load_model reads it back; a file without
    it (written before it was recorded) loads with None; a bad value is refused."""
    from genie_fast.models import GenieModel, ModelFileError, UNet, load_model, save_model

    model = GenieModel(UNet("tiny"))
    assert model.head_error is None
    stem = save_model(model, tmp_path / "a")
    assert "head_error" not in json.loads((tmp_path / "a.json").read_text())
    assert load_model(stem).head_error is None
    model.head_error = 0.42
    stem = save_model(model, tmp_path / "b")
    assert json.loads((tmp_path / "b.json").read_text())["head_error"] == 0.42
    assert load_model(stem).head_error == 0.42
    cfg = json.loads((tmp_path / "b.json").read_text())
    cfg["head_error"] = -1
    (tmp_path / "b.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match="head_error"):
        load_model(stem)


def test_bundled_model_declares_its_measured_head_error():
    from genie_fast.models import load_default

    assert load_default().head_error == pytest.approx(0.535)
