"""denoise_step: the final denoising step x0 = x_bar - gamma_next eps.

Every fused backend against the float64 reference (FlashAttention's rule), with poisoned
outputs, odd shapes, batch 1, layouts, in-place updates, opcheck and CUDA graphs."""
import torch

from genie_fast import ops
from _fused_checks import StepOpTests, StepOp, coeff_rows, cpu_backends, step_inputs


SPEC = StepOp("denoise_step", ops.denoise_step_ref, step_inputs,
              lambda a: [(a[0], a[0].dtype)],
              inplace=[(0, 0)])
CPU = cpu_backends("denoise_step")


class TestDenoiseStep(StepOpTests):
    """The generic step-op checks (see _fused_checks.StepOpTests)."""

    SPEC = SPEC


def test_wrong_coefficient_is_caught():
    """Denoising must use gamma at the END of the step (gamma_next), not gamma_n."""
    c = coeff_rows()["late"]
    x_bar, eps = step_inputs((2, 3, 4, 4), torch.float32, "cpu")
    wrong = x_bar - c[ops.COL["gamma"]].float() * eps
    for backend in CPU:
        got = ops.denoise_step(x_bar, eps, c, backend=backend)
        assert not torch.allclose(got, wrong, rtol=1e-4, atol=0)

# --------------------------------------------------------------------------- on a GPU
