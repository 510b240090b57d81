"""Solvers measured against float64 reference solutions of exact-score problems."""
import math

import pytest
import torch

from genie_fast import ops
from genie_fast.models import GaussianMixture
from genie_fast.reference import reference_solution
from genie_fast.schedule import COL, DiscreteVPSchedule, coeff_table, time_grid
from genie_fast.solvers import NFE_PER_STEP, SOLVERS, exact_deps, nfe_of

SHAPE = (1, 4, 4)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _noise(b=16, seed=0, shape=SHAPE):
    return torch.randn(b, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def problems():
    """name -> (model, x_T, exact solution at t_end): a closed-form Gaussian and a 4-mode mixture."""
    single = GaussianMixture.random(1, SHAPE, seed=1, diagonal=True)
    mix = GaussianMixture.random(4, SHAPE, seed=0)
    x = _noise()
    ref = reference_solution(mix, x, tol=1e-9)
    return {
        "single": (single, x, single.ode_solution(x, 1.0, single.schedule.t_end)),
        "mixture": (mix, x, ref.x),
    }


def _kw(name, model):
    # genie with an ideal head (exact derivatives): what a perfectly distilled head would give
    return {"head": lambda x, t, eps: model.exact_deps(x, t)} if name == "genie" else {}


def _rmse(a, b):
    return float((a - b).pow(2).mean().sqrt())


# expected global order -> band for the measured log2(err_N / err_2N) at 32 -> 64 -> 128 steps
ORDER_BAND = {
    "ddim": (0.85, 1.15),
    "genie": (1.7, 2.3), "genie_exact": (1.7, 2.3), "heun": (1.7, 2.3), "dpm_solver_2": (1.7, 2.3),
    "dpmpp_2m": (1.7, 2.3),
    "dpmpp_3m": (2.5, 3.5), "unipc": (2.5, 3.5),   # third order (unipc: order-2 predictor + corrector)
    "ipndm": (2.5, 4.5),                            # fourth-order Adams-Bashforth after a low-order warm-up
}


@pytest.mark.parametrize("problem", ["single", "mixture"])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_order_of_convergence(problems, problem, name):
    model, x, exact = problems[problem]
    errs = []
    for steps in (16, 32, 64, 128):
        ts = time_grid(model.schedule, steps, "quadratic")
        out, nfe = SOLVERS[name](model, x, ts, model.schedule, **_kw(name, model))
        assert nfe == nfe_of(name, steps)
        errs.append(_rmse(out, exact))
    slopes = [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]
    lo, hi = ORDER_BAND[name]
    assert all(e1 < e0 for e0, e1 in zip(errs, errs[1:])), errs       # converges
    assert all(lo <= s <= hi for s in slopes[1:]), (slopes, errs)     # at its order
    assert errs[-1] < 1e-2


@pytest.mark.parametrize("order,band", [(1, (1.7, 2.3)), (3, (3.5, 4.5))])
def test_unipc_corrector_raises_the_order_by_one(problems, order, band):
    model, x, exact = problems["mixture"]
    errs = [_rmse(SOLVERS["unipc"](model, x, time_grid(model.schedule, n), model.schedule, order=order)[0], exact)
            for n in (32, 64, 128)]
    slopes = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert all(band[0] <= s <= band[1] for s in slopes), (slopes, errs)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_float32_agrees_with_float64(problems, name):
    model, x, _ = problems["mixture"]
    ts = time_grid(model.schedule, 12)
    out64, _ = SOLVERS[name](model, x, ts, model.schedule, **_kw(name, model))
    out32, _ = SOLVERS[name](model, x.float(), ts, model.schedule, **_kw(name, model))
    assert out32.dtype == torch.float32 and out64.dtype == torch.float64
    assert float((out32.double() - out64).abs().max()) < 1e-4


def test_converges_on_a_discrete_schedule():
    sched = DiscreteVPSchedule.linear()
    model = GaussianMixture.random(4, SHAPE, seed=0, schedule=sched)
    x = _noise(8)
    ref = reference_solution(model, x, tol=1e-7, max_steps=1 << 12)
    for name in ("ddim", "genie_exact", "dpmpp_2m", "unipc"):
        errs = [_rmse(SOLVERS[name](model, x, time_grid(sched, n), sched)[0], ref.x) for n in (10, 20, 40)]
        assert errs[2] < errs[1] < errs[0], (name, errs)
    assert errs[2] < 5e-3


class _HeadModel(torch.nn.Module):
    """An eps model with an exact 'head': [h1|h2|h3] = [-gamma deps | 0 | 0] combines to deps."""

    def __init__(self, gmm, mode):
        super().__init__()
        self.gmm, self.schedule = gmm, gmm.schedule
        if mode == "head":
            self.eps_and_head = self._eps_and_head
        else:
            self.eps_and_deps = self._eps_and_deps

    def forward(self, x, t):
        return self.gmm(x, t)

    def _eps_and_deps(self, x, t):
        return self.gmm(x, t), self.gmm.exact_deps(x, t)

    def _eps_and_head(self, x, t):
        eps, deps = self._eps_and_deps(x, t)
        gamma = self.schedule.gamma(t).view(-1, 1, 1, 1).to(x.dtype)
        zero = torch.zeros_like(deps)
        return eps, torch.cat([-gamma * deps, zero, zero], dim=1)


@pytest.mark.parametrize("mode,backend", [("head", "auto"), ("head", "torch"), ("deps", "auto")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_genie_model_paths_match_genie_exact(problems, mode, backend, dtype):
    gmm, x, _ = problems["mixture"]
    ts = time_grid(gmm.schedule, 10)
    want, nfe_exact = SOLVERS["genie_exact"](gmm, x.to(dtype), ts, gmm.schedule)
    got, nfe = SOLVERS["genie"](_HeadModel(gmm, mode), x.to(dtype), ts, gmm.schedule, backend=backend)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert float((got - want).abs().max()) < tol
    assert (nfe, nfe_exact) == (10, 30)


def test_genie_without_derivatives_is_a_clear_error(problems):
    gmm, x, _ = problems["mixture"]
    with pytest.raises(TypeError, match="genie needs d eps/d gamma"):
        SOLVERS["genie"](gmm, x, time_grid(gmm.schedule, 4), gmm.schedule)
    with pytest.raises(TypeError, match="head must be a callable"):
        SOLVERS["genie"](gmm, x, time_grid(gmm.schedule, 4), gmm.schedule, head=3)


class _Counting(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.schedule, self.calls = model, model.schedule, 0

    def forward(self, x, t):
        self.calls += 1
        return self.model(x, t)


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("afs", [False, True])
@pytest.mark.parametrize("denoise", [False, True])
def test_nfe_is_what_the_network_ran(problems, name, afs, denoise):
    gmm, x, _ = problems["mixture"]
    model = _Counting(gmm)
    steps = 5
    _, nfe = SOLVERS[name](model, x[:2], time_grid(gmm.schedule, steps), gmm.schedule, afs=afs, denoise=denoise,
                           **_kw(name, gmm))
    assert nfe == nfe_of(name, steps, afs, denoise)
    if name == "genie_exact":  # the JVP calls the network once and is counted 2 (primal + tangent)
        assert nfe == model.calls + (steps - afs)
    else:
        assert nfe == model.calls
    assert nfe == steps * NFE_PER_STEP[name] - afs * (3 if name == "genie_exact" else 1) + denoise


def test_afs_first_step_is_ddim_with_eps_equal_to_the_noise(problems):
    gmm, x, _ = problems["mixture"]
    ts = time_grid(gmm.schedule, 1)
    row = coeff_table(gmm.schedule, ts)[0]
    want = (x * row[COL["scale"]] + row[COL["h"]] * x) * row[COL["inv_scale_next"]]
    for name in ("ddim", "genie", "genie_exact", "dpmpp_2m"):
        out, nfe = SOLVERS[name](gmm, x, ts, gmm.schedule, afs=True, **_kw(name, gmm))
        assert nfe == 0
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    # and x_T is a good stand-in for eps at t = 1: off by O(alpha_1) relative to the exact eps
    eps = gmm(x, torch.ones(len(x), dtype=torch.float64))
    assert float((eps - x).abs().max()) < 10 * gmm.schedule.alpha(1.0)


@pytest.mark.parametrize("budget", [5, 10])
def test_afs_helps_genie_at_a_small_nfe_budget(problems, budget):
    """GENIE sec. 3.3: the saved evaluation buys one more step, which matters at low NFE."""
    gmm, x, exact = problems["mixture"]
    errs = {}
    for afs in (False, True):
        steps = budget + afs
        out, nfe = SOLVERS["genie"](gmm, x, time_grid(gmm.schedule, steps), gmm.schedule, afs=afs, **_kw("genie", gmm))
        assert nfe == budget
        errs[afs] = _rmse(out, exact)
    assert errs[True] < errs[False], errs


def test_denoising_step_removes_the_remaining_noise():
    """x0 = x_bar_N - gamma_N eps(x_N, t_N): at t_end = 1e-3 the ODE output still carries noise of
    size sigma(t_end) ~ 0.01 per pixel; on near-point-mass data the denoised samples land on a mode."""
    gmm = GaussianMixture.random(3, SHAPE, seed=2, std_range=(1e-3, 1e-3))
    x = _noise(32, seed=5)
    ts = time_grid(gmm.schedule, 40)
    for name in ("ddim", "genie_exact", "dpmpp_2m"):
        plain, nfe0 = SOLVERS[name](gmm, x, ts, gmm.schedule)
        den, nfe1 = SOLVERS[name](gmm, x, ts, gmm.schedule, denoise=True)
        assert nfe1 == nfe0 + 1

        def dist_to_mode(s):
            return float((s.flatten(1)[:, None] - gmm.means[None]).norm(dim=-1).min(1).values.median())

        assert dist_to_mode(den) < 0.05 * dist_to_mode(plain), (dist_to_mode(den), dist_to_mode(plain))
        # and it is exactly the stated formula, applied to the plain run's last state
        t_n = torch.full((len(x),), ts[-1].item(), dtype=torch.float64)
        x_bar = plain * math.sqrt(1 + gmm.schedule.gamma(ts[-1].item()) ** 2)
        want = x_bar - gmm.schedule.gamma(ts[-1].item()) * gmm(plain, t_n)
        torch.testing.assert_close(den, want, rtol=1e-10, atol=1e-12)


def test_exact_deps_agrees_with_the_gmm_method(problems):
    gmm, x, _ = problems["mixture"]
    t = torch.full((len(x),), 0.3, dtype=torch.float64)
    torch.testing.assert_close(exact_deps(gmm, x, t, gmm(x, t), gmm.schedule), gmm.exact_deps(x, t))


@pytest.mark.parametrize("name", list(SOLVERS))
def test_no_host_device_sync_in_the_loop(name):
    """Meta tensors have no data: any .item(), bool(tensor) or data-dependent index raises."""
    gmm = GaussianMixture.random(3, SHAPE, seed=0).to("meta")
    x = torch.empty(4, *SHAPE, device="meta")
    kw = {"head": lambda x, t, eps: torch.zeros_like(x)} if name == "genie" else {}
    out, nfe = SOLVERS[name](gmm, x, time_grid(gmm.schedule, 5), gmm.schedule, afs=True, denoise=True, **kw)
    assert out.device.type == "meta" and out.shape == x.shape and nfe == nfe_of(name, 5, True, True)


def test_meta_check_catches_a_sync():
    def syncing(x, t):
        return x if bool(x.sum() > 0) else -x

    x = torch.empty(2, *SHAPE, device="meta")
    with pytest.raises(Exception):
        SOLVERS["ddim"](syncing, x, time_grid(GaussianMixture.random(1, SHAPE).schedule, 2),
                        GaussianMixture.random(1, SHAPE).schedule)


def test_bad_inputs_are_clear_errors(problems):
    gmm, x, _ = problems["mixture"]
    s = gmm.schedule
    ts = time_grid(s, 4)
    with pytest.raises(ValueError, match="strictly decreasing"):
        SOLVERS["ddim"](gmm, x, ts.flip(0), s)
    with pytest.raises(ValueError, match="at least two times"):
        SOLVERS["ddim"](gmm, x, ts[:1], s)
    with pytest.raises(ValueError, match=r"shape \(B, C, ...\)"):
        SOLVERS["ddim"](gmm, x.flatten(), ts, s)
    with pytest.raises(ValueError, match="floating-point"):
        SOLVERS["ddim"](gmm, x.long(), ts, s)
    with pytest.raises(ValueError, match="unknown backend"):
        SOLVERS["heun"](gmm, x, ts, s, backend="tpu")
    with pytest.raises(TypeError, match="callable"):
        SOLVERS["dpmpp_2m"]("not a model", x, ts, s)
    with pytest.raises(ValueError, match="unipc order"):
        SOLVERS["unipc"](gmm, x, ts, s, order=5)
    with pytest.raises(ValueError, match="ipndm order"):
        SOLVERS["ipndm"](gmm, x, ts, s, order=0)
    assert ops.BACKENDS[0] == "auto"
