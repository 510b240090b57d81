"""dpmpp_2m_step: the DPM-Solver++(2M) multistep update, with the step's solver weights [a, b]
(genie_fast.layout) beside the coefficient row.

Every fused backend against the float64 reference (FlashAttention's rule), with poisoned
outputs, odd shapes, batch 1, layouts, in-place updates, opcheck and CUDA graphs; then the
weights (their role, any float dtype, bad ones) and the solver's weight rows."""
import pytest
import torch

from genie_fast import ops
from genie_fast.layout import DPMPP_2M_A, DPMPP_2M_B
from genie_fast.schedule import VPSchedule, time_grid
from genie_fast.solvers import Plan
from genie_fast.solvers.multistep import _dpmpp_2m_weights
from _fused_checks import (ROW_STEPS, StepOpTests, StepOp, coeff_rows, cpu_backends, grid, poisoned_like, randn,
                           state_dtype, step_inputs)


def _make(shape, net_dtype, device, weights_dtype=torch.float64):
    """x_bar, eps, x0_prev, weights [a, b] (random: both terms count)."""
    return step_inputs(shape, net_dtype, device) + [randn(shape, state_dtype(net_dtype), 2, device),
                                                    randn((ops.DPMPP_2M_WEIGHTS,), torch.float64, 3, device)
                                                    .to(weights_dtype)]


def _outs(a):
    return [(a[0], a[0].dtype), (a[0], a[1].dtype), (a[0], a[0].dtype)]


def _solver_weights(lowered=False) -> torch.Tensor:
    """dpmpp_2m's weight rows [a, b] on the grid of the test table (_fused_checks.table)."""
    plan = Plan(VPSchedule(), grid(), 1, "cpu")
    return torch.tensor(_dpmpp_2m_weights(plan, lowered), dtype=torch.float64)


def _at_row(args, row, device):
    """The solver's weights of step `row` where the checks compare against float64, as a solver runs
    the op (random weights elsewhere)."""
    return [*args[:3], _solver_weights()[ROW_STEPS[row]].to(device=device, dtype=args[3].dtype)]


SPEC = StepOp("dpmpp_2m_step", ops.dpmpp_2m_step_ref, _make, _outs, inplace=[(0, 0), (2, 2)], at_row=_at_row)
CPU = cpu_backends("dpmpp_2m_step")


class TestDpmpp2mStep(StepOpTests):
    """The generic step-op checks (see _fused_checks.StepOpTests)."""

    SPEC = SPEC


def test_wrong_weight_is_caught():
    """x0_prev enters with weight b: dropping it (a first-step weight row) changes the result."""
    x_bar, eps, x0_prev, w = _make((2, 3, 4, 4), torch.float32, "cpu")
    c = coeff_rows()["late"]
    want = ops.dpmpp_2m_step_ref(x_bar, eps, x0_prev, w, c)
    w = w.clone()
    w[DPMPP_2M_B] = 0.0
    got = ops.dpmpp_2m_step(x_bar, eps, x0_prev, w, c, backend="cpp")
    assert not torch.allclose(got[0], want[0], rtol=1e-4, atol=0)


def test_first_step_ignores_x0_prev():
    """With the first step's weights (a = 1, b = 0) the result does not depend on x0_prev (zeros or garbage)."""
    c = coeff_rows()["first"]
    x_bar, eps, x0_prev, _ = _make((2, 3, 4, 4), torch.float32, "cpu")
    w = torch.tensor([1.0, 0.0], dtype=torch.float64)
    for backend in CPU:
        a = ops.dpmpp_2m_step(x_bar, eps, torch.zeros_like(x0_prev), w, c, backend=backend)
        b = ops.dpmpp_2m_step(x_bar, eps, x0_prev, w, c, backend=backend)
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_weights_any_float_dtype(backend, weights_dtype):
    """Weights in any float dtype (and strided) are read in the state's math type, as the reference reads them."""
    c = coeff_rows()["late"]
    args = _make((2, 3, 5, 7), torch.float32, "cpu", weights_dtype=weights_dtype)
    want = ops.dpmpp_2m_step_ref(*args, c)
    wide = torch.zeros(2 * ops.DPMPP_2M_WEIGHTS, dtype=weights_dtype)
    wide[::2] = args[3]
    for w in (args[3], wide[::2]):
        got = ops.dpmpp_2m_step(*args[:3], w, c, backend=backend)
        for i, (g, r) in enumerate(zip(got, want)):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-4, msg=f"output {i}")


@pytest.mark.parametrize("backend", ["torch"] + CPU)
def test_bad_weights(backend):
    x_bar, eps, x0_prev, w = _make((2, 3, 4, 4), torch.float32, "cpu")
    c = coeff_rows()["late"]
    with pytest.raises(ValueError, match="weights must be 2 values"):
        ops.dpmpp_2m_step(x_bar, eps, x0_prev, w[:1], c, backend=backend)
    with pytest.raises(ValueError, match="weights must be 2 values"):
        ops.dpmpp_2m_step(x_bar, eps, x0_prev, w.view(1, 2), c, backend=backend)


def test_cpp_op_checks():
    x_bar, eps, x0_prev, w = _make((2, 3, 4, 4), torch.float32, "cpu")
    c = coeff_rows()["late"]
    outs = [torch.empty(like.shape, dtype=dt) for like, dt in _outs([x_bar, eps])]

    def op(*args):
        torch.ops.genie_fast.dpmpp_2m_step_out(*args, *outs)
    with pytest.raises(RuntimeError, match="x0_prev dtype"):
        op(x_bar, eps, x0_prev.half(), w, c)
    with pytest.raises(RuntimeError, match="weights must be 2 values"):
        op(x_bar, eps, x0_prev, w[:1], c)
    with pytest.raises(RuntimeError, match="weights must be float64, float32"):
        op(x_bar, eps, x0_prev, w.long(), c)


@pytest.mark.skipif("triton" not in CPU, reason="Triton unavailable on the CPU here")
def test_triton_launcher_checks():
    from genie_fast.kernels import dpmpp_2m_step as launch

    args = _make((2, 3, 4, 4), torch.float32, "cpu")
    c = coeff_rows()["late"]
    outs = [poisoned_like(like, dt) for like, dt in _outs(args)]
    with pytest.raises(TypeError, match="weights must be float64"):
        launch(*args[:3], args[3].int(), c, *outs)
    with pytest.raises(ValueError, match="weights must be 2 values"):
        launch(*args[:3], args[3][:1], c, *outs)
    outs[2] = poisoned_like(args[0], torch.float64)
    with pytest.raises(ValueError, match="output x0 must be"):
        launch(*args, c, *outs)


def test_solver_weights():
    """The weights dpmpp_2m keeps in its plan: on a uniform log-SNR grid the step ratio is 1, so
    a = 3/2, b = -1/2 after the first step, which is DDIM (1, 0); the lowered last step is (1, 0)."""
    s = VPSchedule()
    plan = Plan(s, time_grid(s, 6, "logsnr"), 1, "cpu")
    w = torch.tensor(_dpmpp_2m_weights(plan, lowered=False), dtype=torch.float64)
    assert w.shape == (6, ops.DPMPP_2M_WEIGHTS) and w[0].tolist() == [1.0, 0.0]
    torch.testing.assert_close(w[1:, DPMPP_2M_A], torch.full((5,), 1.5, dtype=torch.float64))
    torch.testing.assert_close(w[1:, DPMPP_2M_B], torch.full((5,), -0.5, dtype=torch.float64))
    lowered = torch.tensor(_dpmpp_2m_weights(plan, lowered=True), dtype=torch.float64)
    assert torch.equal(lowered[:-1], w[:-1]) and lowered[-1].tolist() == [1.0, 0.0]


# --------------------------------------------------------------------------- on a GPU
