"""ddim_step: the DDIM step (also the AFS first step with eps = x_T).

Every fused backend against the float64 reference (FlashAttention's rule), with poisoned
outputs, odd shapes, batch 1, layouts, in-place updates, opcheck and CUDA graphs."""
import torch

from genie_fast import ops
from _fused_checks import StepOpTests, StepOp, coeff_rows, cpu_backends, randn, step_inputs


SPEC = StepOp("ddim_step", ops.ddim_step_ref, step_inputs,
              lambda a: [(a[0], a[0].dtype), (a[0], a[1].dtype)],
              inplace=[(0, 0)])
CPU = cpu_backends("ddim_step")


class TestDdimStep(StepOpTests):
    """The generic step-op checks (see _fused_checks.StepOpTests)."""

    SPEC = SPEC


def test_wrong_coefficient_is_caught():
    """The reference check can fail: a step size off by one ulp-scale factor is detected."""
    c = coeff_rows()["late"].clone()
    x_bar, eps = step_inputs((2, 3, 4, 4), torch.float32, "cpu")
    want = ops.ddim_step_ref(x_bar, eps, c)
    c[ops.COL["h"]] *= 1.001
    got = ops.ddim_step(x_bar, eps, c, backend="cpp")
    assert not torch.allclose(got[0], want[0], rtol=1e-5, atol=0)


def test_afs_first_step():
    """AFS: the first step with eps = x_T is a DDIM step from x_bar_0 = x_T sqrt(1 + gamma_0^2)."""
    c = coeff_rows()["first"]
    x_T = randn((2, 3, 5, 7), torch.float16, 3)
    x_bar = x_T.float() * c[ops.COL["scale"]].float()
    want = ops.ddim_step_ref(x_bar, x_T, c)
    for backend in CPU:
        got = ops.ddim_step(x_bar, x_T, c, backend=backend)
        torch.testing.assert_close(got[0], want[0], rtol=2e-6, atol=0)
        assert got[1].dtype == torch.float16

# --------------------------------------------------------------------------- on a GPU
