"""schedule_table: the coefficient table computed on the device must equal schedule.coeff_table
(the host float64 table) for VPSchedule on every backend; other schedules get the host table."""
import pytest
import torch

from genie_fast import ops
from genie_fast.schedule import COEFF_COLUMNS, DiscreteVPSchedule, VPSchedule, coeff_table, time_grid
from _fused_checks import cuda

BACKENDS = [b for b in ops.available_backends("schedule_table", "cpu")]
SCHEDULES = {"default": VPSchedule(), "other": VPSchedule(beta_min=0.05, beta_d=15.0, t_end=1e-4)}
# float64 round-off only: the closed forms are evaluated in the same order as the host table;
# h = gamma_next - gamma cancels, so allow a little more than one ulp of relative error.
RTOL = 1e-12


def _grid(schedule, kind, n, dtype=torch.float64):
    return time_grid(schedule, n, kind).to(dtype)


def test_cpp_backend_is_built():
    assert "cpp" in BACKENDS


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("kind", ["quadratic", "uniform", "logsnr", "edm"])
@pytest.mark.parametrize("n", [1, 2, 7, 300])
def test_equals_host_table(backend, name, kind, n):
    s = SCHEDULES[name]
    ts = _grid(s, kind, n)
    got = ops.schedule_table(s, ts, backend=backend)
    want = coeff_table(s, ts)
    assert got.shape == (n, len(COEFF_COLUMNS)) and got.dtype == torch.float64 and got.device == ts.device
    torch.testing.assert_close(got, want, rtol=RTOL, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_times_and_encoding_direction(backend):
    s = VPSchedule()
    ts32 = _grid(s, "quadratic", 12, torch.float32)
    torch.testing.assert_close(ops.schedule_table(s, ts32, backend=backend), coeff_table(s, ts32.double()),
                               rtol=RTOL, atol=0)
    up = _grid(s, "uniform", 9).flip(0)  # t_end -> 1: the encoding direction, h > 0
    torch.testing.assert_close(ops.schedule_table(s, up, backend=backend), coeff_table(s, up), rtol=RTOL, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_discrete_schedule_gets_the_host_table(backend):
    s = DiscreteVPSchedule.cosine(1000)
    ts = time_grid(s, 10, "quadratic")
    torch.testing.assert_close(ops.schedule_table(s, ts, backend=backend), coeff_table(s, ts), rtol=0, atol=0)


def test_wrong_schedule_parameter_is_caught():
    s = VPSchedule()
    ts = _grid(s, "quadratic", 10)
    got = torch.ops.genie_fast.schedule_table(ts, s.beta_min, s.beta_d * (1 + 1e-9))
    assert not torch.allclose(got, coeff_table(s, ts), rtol=RTOL, atol=0)


def test_opcheck():
    s = VPSchedule()
    for dtype in (torch.float64, torch.float32):
        torch.library.opcheck(torch.ops.genie_fast.schedule_table.default,
                              (_grid(s, "quadratic", 10, dtype), s.beta_min, s.beta_d))


@pytest.mark.parametrize("backend", ["cpp"] + (["triton"] if "triton" in BACKENDS else []))
def test_bad_arguments(backend):
    s = VPSchedule()
    ts = _grid(s, "quadratic", 4)
    with pytest.raises(ValueError, match="1-D grid of at least two times"):
        ops.schedule_table(s, ts[:1], backend=backend)
    with pytest.raises(ValueError, match="1-D grid"):
        ops.schedule_table(s, ts.view(1, -1), backend=backend)
    with pytest.raises(TypeError, match="tensor of times"):
        ops.schedule_table(s, ts.tolist(), backend=backend)
    with pytest.raises(RuntimeError, match="beta_d > 0"):
        torch.ops.genie_fast.schedule_table(ts, 0.1, 0.0)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.genie_fast.schedule_table(ts.half(), 0.1, 19.9)


@cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("n", [1, 10, 1000])
def test_cuda_equals_host_table(backend, n):
    s = SCHEDULES["other"]
    ts = _grid(s, "logsnr", n)
    got = ops.schedule_table(s, ts.cuda(), backend=backend)
    assert got.is_cuda
    torch.testing.assert_close(got.cpu(), coeff_table(s, ts), rtol=RTOL, atol=0)


@cuda
def test_cuda_opcheck_and_auto():
    s = VPSchedule()
    torch.library.opcheck(torch.ops.genie_fast.schedule_table.default,
                          (_grid(s, "quadratic", 10).cuda(), s.beta_min, s.beta_d))
    assert ops._pick("schedule_table", torch.device("cuda"), "auto") == "cuda"
