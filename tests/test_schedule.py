import math

import pytest
import torch

from genie_fast.schedule import COL, GRIDS, DiscreteVPSchedule, VPSchedule, coeff_table, time_grid

SCHEDULES = {
    "vp": VPSchedule(),
    "vp_other": VPSchedule(beta_min=0.05, beta_d=15.0, t_end=1e-4),
    "linear": DiscreteVPSchedule.linear(),
    "cosine": DiscreteVPSchedule.cosine(),
}


@pytest.fixture(params=list(SCHEDULES))
def sched(request):
    return SCHEDULES[request.param]


def _times(s, n=101):
    return torch.linspace(s.t_end, 1.0, n, dtype=torch.float64)


def test_vp_formulas_match_method_md():
    """The VP closed forms of docs/method.md, section 1 and 2, written out independently."""
    s, t = VPSchedule(), torch.tensor([1e-3, 0.3, 1.0], dtype=torch.float64)
    log_alpha = -(0.1 * t + 19.9 * t**2 / 2) / 2
    alpha = torch.exp(log_alpha)
    torch.testing.assert_close(s.alpha(t), alpha, rtol=1e-14, atol=0)
    torch.testing.assert_close(s.sigma(t), torch.sqrt(1 - alpha**2), rtol=1e-12, atol=0)
    torch.testing.assert_close(s.gamma(t), torch.sqrt(1 - alpha**2) / alpha, rtol=1e-12, atol=0)
    torch.testing.assert_close(s.log_snr(t), 2 * torch.log(alpha / torch.sqrt(1 - alpha**2)), rtol=1e-12, atol=0)
    g = s.gamma(t)
    want = 2 * g / ((1 + g**2) * torch.sqrt(0.1**2 + 2 * 19.9 * torch.log(1 + g**2)))
    torch.testing.assert_close(s.dt_dgamma(g), want, rtol=1e-13, atol=0)


def test_alpha_sigma_unit_norm(sched):
    t = _times(sched)
    torch.testing.assert_close(sched.alpha(t) ** 2 + sched.sigma(t) ** 2, torch.ones_like(t), rtol=1e-13, atol=0)


def test_t_of_gamma_inverts_gamma(sched):
    t = _times(sched)
    torch.testing.assert_close(sched.t_of_gamma(sched.gamma(t)), t, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sched.t_of_log_snr(sched.log_snr(t)), t, rtol=1e-10, atol=1e-12)


def test_dt_dgamma_against_finite_differences(sched):
    # stay off the knots of the discrete schedules' piecewise-linear log alpha
    t = _times(sched, 37)[1:-1] + 1.7e-4
    g = sched.gamma(t)
    e = 1e-6 * g
    fd = (sched.t_of_gamma(g + e) - sched.t_of_gamma(g - e)) / (2 * e)
    torch.testing.assert_close(sched.dt_dgamma(g), fd, rtol=1e-6, atol=0)


def test_floats_in_floats_out(sched):
    assert isinstance(sched.gamma(0.5), float)
    assert isinstance(sched.t_of_gamma(3.0), float)
    assert sched.gamma(0.5) == pytest.approx(float(sched.gamma(torch.tensor(0.5, dtype=torch.float64))))


def test_float32_tensors_keep_dtype():
    s = VPSchedule()
    t = torch.rand(5, dtype=torch.float32) * 0.9 + 0.1
    assert s.gamma(t).dtype == torch.float32
    assert s.alpha(t).dtype == torch.float32


def test_gamma_small_t_accurate():
    # sigma and gamma via expm1 keep full relative accuracy as t -> 0
    s, t = VPSchedule(), 1e-7
    assert s.gamma(t) == pytest.approx(math.sqrt(0.1 * t / 1.0), rel=1e-5)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="t_end"):
        VPSchedule(t_end=0.0)
    with pytest.raises(ValueError, match="beta"):
        VPSchedule(beta_d=-1.0)
    with pytest.raises(ValueError, match="beta"):
        DiscreteVPSchedule([0.1, 1.5])
    with pytest.raises(ValueError, match="t_end"):
        DiscreteVPSchedule.linear(t_end=1e-5)


@pytest.mark.parametrize("discrete", ["linear", "cosine"])
def test_discrete_schedule_matches_its_betas(discrete):
    s = SCHEDULES[discrete]
    alpha_bar = torch.cumprod(1 - s.betas, 0)
    t_n = torch.arange(1, s.num_steps + 1, dtype=torch.float64) / s.num_steps
    torch.testing.assert_close(s.alpha(t_n) ** 2, alpha_bar, rtol=1e-12, atol=0)
    # between knots log alpha is linear in t
    mid = (t_n[:-1] + t_n[1:]) / 2
    torch.testing.assert_close(s.log_alpha(mid), 0.25 * torch.log(alpha_bar[:-1] * alpha_bar[1:]), rtol=1e-12, atol=0)
    # model time is the step index
    torch.testing.assert_close(s.model_time(t_n), torch.arange(s.num_steps, dtype=torch.float64))


def test_linear_ddpm_betas():
    s = DiscreteVPSchedule.linear()
    assert float(s.betas[0]) == pytest.approx(1e-4) and float(s.betas[-1]) == pytest.approx(0.02)
    # the continuous VP schedule with beta_min=0.1, beta_d=19.9 is its limit; they differ by
    # log(1 - beta) vs -beta (relative beta_max / 2 = 1%) and the half-step offset of t_n
    t = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(s.log_alpha(t), VPSchedule().log_alpha(t), rtol=1e-2, atol=0)


@pytest.mark.parametrize("kind", GRIDS)
@pytest.mark.parametrize("n", [1, 2, 7, 50])
def test_grids_monotone_and_end_where_asked(sched, kind, n):
    ts = time_grid(sched, n, kind)
    assert ts.dtype == torch.float64 and len(ts) == n + 1
    assert bool((ts[1:] < ts[:-1]).all())
    assert float(ts[0]) == 1.0 and float(ts[-1]) == sched.t_end
    ts = time_grid(sched, n, kind, t_start=0.8, t_end=0.01)
    assert float(ts[0]) == 0.8 and float(ts[-1]) == 0.01


@pytest.mark.parametrize("kind", GRIDS)
def test_encoding_grid_is_the_sampling_grid_reversed(sched, kind):
    """Swapping t_start and t_end gives the same times in increasing order (the encoding direction)."""
    down = time_grid(sched, 9, kind)
    up = time_grid(sched, 9, kind, t_start=sched.t_end, t_end=1.0)
    assert bool((up[1:] > up[:-1]).all()) and float(up[0]) == sched.t_end and float(up[-1]) == 1.0
    torch.testing.assert_close(up, down.flip(0), rtol=1e-12, atol=0)


def test_grid_shapes():
    s = VPSchedule()
    ts = time_grid(s, 10, "quadratic")
    d = torch.diff(torch.sqrt(ts))
    torch.testing.assert_close(d, torch.full_like(d, float(d[0])))
    d = torch.diff(time_grid(s, 10, "uniform"))
    torch.testing.assert_close(d, torch.full_like(d, float(d[0])))
    d = torch.diff(s.log_snr(time_grid(s, 10, "logsnr")))
    torch.testing.assert_close(d, torch.full_like(d, float(d[0])))
    d = torch.diff(s.gamma(time_grid(s, 10, "edm")) ** (1 / 7))
    torch.testing.assert_close(d, torch.full_like(d, float(d[0])))


def test_user_grid_and_bad_grids():
    s = VPSchedule()
    ts = time_grid(s, 0, [1.0, 0.5, 0.1])
    assert ts.tolist() == [1.0, 0.5, 0.1]
    assert time_grid(s, 0, [0.1, 0.5]).tolist() == [0.1, 0.5]  # increasing: encoding
    with pytest.raises(ValueError, match="strictly monotone"):
        time_grid(s, 0, [0.1, 0.5, 0.3])
    with pytest.raises(ValueError, match="strictly monotone"):
        time_grid(s, 0, [0.5, 0.5])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        time_grid(s, 0, [1.5, 0.5])
    with pytest.raises(ValueError, match="unknown time grid"):
        time_grid(s, 5, "cubic")
    with pytest.raises(ValueError, match="positive integer"):
        time_grid(s, 0, "uniform")
    with pytest.raises(ValueError, match="t_end"):
        time_grid(s, 5, "uniform", t_end=2.0)


def test_coeff_table_columns():
    s = VPSchedule()
    ts = time_grid(s, 6, "logsnr")
    tab = coeff_table(s, ts)
    assert tab.shape == (6, len(COL)) and tab.dtype == torch.float64
    g = s.gamma(ts)
    torch.testing.assert_close(tab[:, COL["t"]], ts[:-1])
    torch.testing.assert_close(tab[:, COL["h"]], g[1:] - g[:-1])
    torch.testing.assert_close(tab[:, COL["half_h2"]], (g[1:] - g[:-1]) ** 2 / 2)
    torch.testing.assert_close(tab[:, COL["w1"]] * g[:-1], -torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(tab[:, COL["scale"]], 1 / s.alpha(ts[:-1]))
    torch.testing.assert_close(tab[:, COL["inv_scale_next"]], s.alpha(ts[1:]))
    # uniform logSNR steps: r = gamma_{n+1} / gamma_n = exp(-h_lambda) is the same on every step
    torch.testing.assert_close(tab[:, COL["dpm_r"]], g[1:] / g[:-1])
    torch.testing.assert_close(tab[:, COL["dpm_r"]], tab[:1, COL["dpm_r"]].expand(6))
    # a solver's own weights (DPM-Solver++(2M)'s a, b) are not columns: tests/test_dpmpp_2m_step.py
    assert not {"dpm_a", "dpm_b"} & set(COL)
