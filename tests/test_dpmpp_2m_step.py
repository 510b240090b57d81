"""dpmpp_2m_step: the DPM-Solver++(2M) multistep update.

Every fused backend against the float64 reference (FlashAttention's rule), with poisoned
outputs, odd shapes, batch 1, layouts, in-place updates, opcheck and CUDA graphs."""
import pytest
import torch

from genie_fast import ops
from _fused_checks import StepOpTests, StepOp, coeff_rows, cpu_backends, randn, state_dtype, step_inputs


def _make(shape, net_dtype, device):
    return step_inputs(shape, net_dtype, device) + [randn(shape, state_dtype(net_dtype), 2, device)]


SPEC = StepOp("dpmpp_2m_step", ops.dpmpp_2m_step_ref, _make,
              lambda a: [(a[0], a[0].dtype), (a[0], a[1].dtype), (a[0], a[0].dtype)],
              inplace=[(0, 0), (2, 2)])
CPU = cpu_backends("dpmpp_2m_step")


class TestDpmpp2mStep(StepOpTests):
    """The generic step-op checks (see _fused_checks.StepOpTests)."""

    SPEC = SPEC


def test_wrong_coefficient_is_caught():
    """x0_prev enters with weight dpm_b: dropping it (a first-step row) changes the result."""
    tab = coeff_rows()
    x_bar, eps, x0_prev = _make((2, 3, 4, 4), torch.float32, "cpu")
    c = tab["late"].clone()
    want = ops.dpmpp_2m_step_ref(x_bar, eps, x0_prev, c)
    c[ops.COL["dpm_b"]] = 0.0
    got = ops.dpmpp_2m_step(x_bar, eps, x0_prev, c, backend="cpp")
    assert not torch.allclose(got[0], want[0], rtol=1e-4, atol=0)


def test_first_row_ignores_x0_prev():
    """On step 0 (dpm_b = 0) the result does not depend on x0_prev (zeros or garbage)."""
    c = coeff_rows()["first"]
    x_bar, eps, x0_prev = _make((2, 3, 4, 4), torch.float32, "cpu")
    for backend in CPU:
        a = ops.dpmpp_2m_step(x_bar, eps, torch.zeros_like(x0_prev), c, backend=backend)
        b = ops.dpmpp_2m_step(x_bar, eps, x0_prev, c, backend=backend)
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)


def test_x0_prev_dtype_refused():
    c = coeff_rows()["late"]
    x_bar, eps, x0_prev = _make((2, 3, 4, 4), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="x0_prev dtype"):
        torch.ops.genie_fast.dpmpp_2m_step(x_bar, eps, x0_prev.half(), c)

# --------------------------------------------------------------------------- on a GPU
