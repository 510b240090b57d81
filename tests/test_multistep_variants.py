"""lower_order_final of dpmpp_2m, dpmpp_3m and unipc, and dpmpp_3m's variant, against direct float64
implementations of the published formulas, written here in x = alpha x_bar coordinates with the
step orders taken from each peer's own statement of its rule (the solvers work in x_bar with
precomputed weights); every network input and the result agree to 1e-12 on an exact-score mixture.
Also: the keywords through sample() and SamplingEngine (part of the graph key), and bad values.
The orders of convergence of the two dpmpp_3m variants: tests/test_solvers.py."""
import math

import pytest
import torch

import genie_fast
from genie_fast.engine import SamplingEngine
from genie_fast.models import GaussianMixture
from genie_fast.schedule import time_grid
from genie_fast.solvers import SOLVERS

SHAPE = (1, 4, 4)
TOL = 1e-12
RULES = (False, True, "diffusers")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gmm():
    return GaussianMixture.random(4, SHAPE, seed=0)


def _noise(b=6, seed=0):
    return torch.randn(b, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


class _Recorder:
    """The model, recording every network input (the state at each evaluation)."""

    def __init__(self, model):
        self.model, self.schedule, self.inputs = model, model.schedule, []

    def __call__(self, x, t):
        self.inputs.append(x.clone())
        return self.model(x, t)


def _orders(num_steps, order, rule, family):
    """Each step's order, written from each peer's own rule (n: 0-based step, N steps)."""
    out = []
    for n in range(num_steps):
        p = min(order, n + 1)  # warm-up: step n has n + 1 data predictions
        if family == "unipc" and rule is not False:
            # the UniPC authors' sampler: min(order, steps + 1 - step) for the 1-based step n + 1;
            # UniPCMultistepScheduler: min(order, len(timesteps) - step_index); neither has a threshold
            p = min(p, num_steps - n)
        elif rule is True and num_steps < 10:  # DPM-Solver's sampler: min(order, steps + 1 - step)
            p = min(p, num_steps - n)
        elif rule == "diffusers" and num_steps < 15:  # lower_order_final / lower_order_second flags
            p = 1 if n == num_steps - 1 else min(p, 2) if n == num_steps - 2 else p
        out.append(p)
    return out


def _coefficients(model, ts):
    s = model.schedule
    t = torch.as_tensor(ts, dtype=torch.float64)
    alpha, sigma = s.alpha(t), s.sigma(t)
    return t, alpha, sigma, torch.log(alpha) - torch.log(sigma)


def _eval(model, x, t, n, afs, visited):
    if n == 0 and afs:
        return x  # the analytical first step: eps(x_T, 1) = x_T
    visited.append(x)
    return model(x, model.schedule.model_time(t[n]).expand(x.shape[0]))


def direct_dpmpp(model, x, ts, orders, second="dpmsolver", d2_factor=1.0, afs=False):
    """Multistep DPM-Solver++ in x as DPM-Solver's code writes it (phi_1 = e^{-h} - 1,
    phi_2 = phi_1 / h + 1, phi_3 = phi_2 / h - 1/2), with the order-2 step in the 'dpmsolver' or
    'taylor' form and the D2 term times d2_factor (1: the released code, 2: the consistent method)."""
    t, alpha, sigma, lam = _coefficients(model, ts)
    x0s, visited = [], []
    for n, p in enumerate(orders):
        x0s.append((x - sigma[n] * _eval(model, x, t, n, afs, visited)) / alpha[n])
        h = lam[n + 1] - lam[n]
        phi1 = torch.expm1(-h)
        phi2 = phi1 / h + 1
        phi3 = phi2 / h - 0.5
        x_next = sigma[n + 1] / sigma[n] * x - alpha[n + 1] * phi1 * x0s[-1]
        if p >= 2:
            r0 = (lam[n] - lam[n - 1]) / h
            d1_0 = (x0s[-1] - x0s[-2]) / r0
        if p == 2:
            x_next = x_next + (-0.5 * alpha[n + 1] * phi1 * d1_0 if second == "dpmsolver"
                               else alpha[n + 1] * phi2 * d1_0)
        if p == 3:
            r1 = (lam[n - 1] - lam[n - 2]) / h
            d1_1 = (x0s[-2] - x0s[-3]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x_next = x_next + alpha[n + 1] * phi2 * d1 - d2_factor * alpha[n + 1] * phi3 * d2
        x = x_next
    return x, visited


def direct_unipc(model, x, ts, orders, afs=False):
    """UniPC-bh2 in x (Zhao et al. 2023): B = e^{-h} - 1, the conditions sum_j rho_j r_j^(k-1) =
    k! psi_k / B with psi_1 = (e^{-h} - 1) / (-h) - 1, psi_{k+1} = psi_k / (-h) - 1 / (k+1)!; the
    predictor uses the p - 1 earlier points (rho = 1/2 for p = 2), the corrector adds the new one
    (rho = 1/2 for p = 1); the last step has no corrector."""
    t, alpha, sigma, lam = _coefficients(model, ts)
    visited, num_steps = [], len(orders)
    x0s = [(x - sigma[0] * _eval(model, x, t, 0, afs, visited)) / alpha[0]]
    for n, p in enumerate(orders):
        h = lam[n + 1] - lam[n]
        big_b = torch.expm1(-h)
        r = [float((lam[n - j] - lam[n]) / h) for j in range(1, p)] + [1.0]
        d = [(x0s[n - j] - x0s[n]) / r[j - 1] for j in range(1, p)]
        psi, fact, rhs = float(big_b / -h - 1), 1, []
        for k in range(1, p + 1):
            rhs.append(psi * fact / float(big_b))
            fact *= k + 1
            psi = psi / float(-h) - 1.0 / fact
        vander = torch.tensor([[rj ** (k - 1) for rj in r] for k in range(1, p + 1)], dtype=torch.float64)
        rhs = torch.tensor(rhs, dtype=torch.float64)
        rho_p = [] if p == 1 else [0.5] if p == 2 else torch.linalg.solve(vander[:-1, :-1], rhs[:-1]).tolist()
        x_lin = sigma[n + 1] / sigma[n] * x - alpha[n + 1] * big_b * x0s[n]
        x = x_lin - alpha[n + 1] * big_b * sum((w * dj for w, dj in zip(rho_p, d)), torch.zeros_like(x))
        if n + 1 < num_steps:
            x0_new = (x - sigma[n + 1] * _eval(model, x, t, n + 1, False, visited)) / alpha[n + 1]
            rho_c = [0.5] if p == 1 else torch.linalg.solve(vander, rhs).tolist()
            x = x_lin - alpha[n + 1] * big_b * (sum((w * dj for w, dj in zip(rho_c[:-1], d)), torch.zeros_like(x))
                                                + rho_c[-1] * (x0_new - x0s[n]))
            x0s.append(x0_new)
    return x, visited


def _compare(model, x, ts, solver, kw, direct_out, afs):
    rec = _Recorder(model)
    out, _ = SOLVERS[solver](rec, x, ts, model.schedule, afs=afs, **kw)
    want, visited = direct_out
    assert len(rec.inputs) == len(visited)
    for n, (got, exp) in enumerate(zip(rec.inputs, visited)):  # the state at every evaluation
        assert float((got - exp).abs().max()) < TOL, (n, float((got - exp).abs().max()))
    assert float((out - want).abs().max()) < TOL, float((out - want).abs().max())


STEPS = (4, 9, 10, 14, 15)  # on both sides of the thresholds 10 and 15


@pytest.mark.parametrize("afs", [False, True])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("steps", STEPS)
def test_dpmpp_2m_lower_order_final_is_the_formula(gmm, steps, rule, afs):
    x, ts = _noise(), time_grid(gmm.schedule, steps, "logsnr")
    direct = direct_dpmpp(gmm, x, ts, _orders(steps, 2, rule, "dpm"), "dpmsolver", afs=afs)
    _compare(gmm, x, ts, "dpmpp_2m", {"lower_order_final": rule}, direct, afs)


@pytest.mark.parametrize("afs", [False, True])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("variant", ["consistent", "reference"])
@pytest.mark.parametrize("steps", STEPS)
def test_dpmpp_3m_variants_and_lower_order_final_are_the_formulas(gmm, steps, variant, rule, afs):
    """consistent: 'taylor' order-2 steps, D2 weighted twice the released code's; reference: the
    released code ('dpmsolver' order-2 steps, its own D2 weight)."""
    x, ts = _noise(), time_grid(gmm.schedule, steps, "logsnr")
    second, d2_factor = ("taylor", 2.0) if variant == "consistent" else ("dpmsolver", 1.0)
    direct = direct_dpmpp(gmm, x, ts, _orders(steps, 3, rule, "dpm"), second, d2_factor, afs=afs)
    _compare(gmm, x, ts, "dpmpp_3m", {"variant": variant, "lower_order_final": rule}, direct, afs)


@pytest.mark.parametrize("afs", [False, True])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("steps", (2, 4, 9, 15))
def test_unipc_lower_order_final_is_the_formula(gmm, steps, order, rule, afs):
    x, ts = _noise(), time_grid(gmm.schedule, steps, "logsnr")
    direct = direct_unipc(gmm, x, ts, _orders(steps, order, rule, "unipc"), afs=afs)
    _compare(gmm, x, ts, "unipc", {"order": order, "lower_order_final": rule}, direct, afs)


def test_the_rules_lower_where_they_say(gmm):
    """True lowers below 10 steps, "diffusers" below 15, for unipc at every step count."""
    x = _noise()

    def run(solver, steps, **kw):
        return SOLVERS[solver](gmm, x, time_grid(gmm.schedule, steps, "logsnr"), gmm.schedule, **kw)[0]
    for solver in ("dpmpp_2m", "dpmpp_3m"):
        for steps, lowers in ((9, {True, "diffusers"}), (14, {"diffusers"}), (15, set())):
            plain = run(solver, steps)
            for rule in (True, "diffusers"):
                assert torch.equal(run(solver, steps, lower_order_final=rule), plain) == (rule not in lowers)
    plain = run("unipc", 30)
    assert not torch.equal(run("unipc", 30, lower_order_final=True), plain)
    assert torch.equal(run("unipc", 30, lower_order_final=True), run("unipc", 30, lower_order_final="diffusers"))


def test_sample_and_the_engine_take_the_keywords(gmm):
    noise = _noise(4, seed=1)
    kw = {"variant": "reference", "lower_order_final": "diffusers"}
    got, nfe = genie_fast.sample(gmm, noise=noise, solver="dpmpp_3m", nfe=8, grid="logsnr", afs=True, **kw)
    want, _ = SOLVERS["dpmpp_3m"](gmm, noise, time_grid(gmm.schedule, 9, "logsnr"), gmm.schedule, afs=True, **kw)
    assert nfe == 8
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got2m, _ = genie_fast.sample(gmm, noise=noise, solver="dpmpp_2m", nfe=8, lower_order_final=True)
    assert not torch.equal(got2m, genie_fast.sample(gmm, noise=noise, solver="dpmpp_2m", nfe=8)[0])

    eng = SamplingEngine(gmm, device="cpu")
    keys = [eng.key(noise, solver="dpmpp_3m", nfe=8), eng.key(noise, solver="dpmpp_3m", nfe=8, variant="reference"),
            eng.key(noise, solver="dpmpp_3m", nfe=8, lower_order_final=True),
            eng.key(noise, solver="dpmpp_3m", nfe=8, lower_order_final="diffusers"),
            eng.key(noise, solver="unipc", nfe=8, lower_order_final=True)]
    assert len(set(keys)) == len(keys)  # solver keywords are part of the graph key
    a, _ = eng.sample(noise, solver="dpmpp_3m", nfe=8, grid="logsnr", afs=True, **kw)
    b, _ = eng.sample(noise, solver="dpmpp_3m", nfe=8, grid="logsnr", afs=True)
    torch.testing.assert_close(a, want, rtol=0, atol=0)  # float64 noise: a float64 state
    assert not torch.equal(a, b)


def test_bad_values_are_clear_errors(gmm):
    x, ts, s = _noise(2), time_grid(gmm.schedule, 4), gmm.schedule
    with pytest.raises(ValueError, match="dpmpp_3m variant must be one of .*'consistent', 'reference'.*got 'taylor'"):
        SOLVERS["dpmpp_3m"](gmm, x, ts, s, variant="taylor")
    for solver in ("dpmpp_2m", "dpmpp_3m", "unipc"):
        for bad in ("reference", None, 1, "True"):
            with pytest.raises(ValueError, match=r"lower_order_final must be False, True .* or 'diffusers'"):
                SOLVERS[solver](gmm, x, ts, s, lower_order_final=bad)
    with pytest.raises(ValueError, match="lower_order_final must be"):
        genie_fast.sample(gmm, n=2, solver="dpmpp_2m", nfe=4, lower_order_final="always")
    with pytest.raises(ValueError, match="variant must be"):
        genie_fast.sample(gmm, n=2, solver="dpmpp_3m", nfe=4, variant=3)
