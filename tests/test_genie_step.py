"""genie_step: every fused backend against the float64 reference (FlashAttention's rule), with
poisoned outputs, odd shapes, batch 1, layouts, in-place updates, opcheck and CUDA graphs."""
import pytest
import torch

from genie_fast import ops
from _fused_checks import StepOpTests, StepOp, coeff_rows, cpu_backends, randn, step_inputs


def _make(shape, net_dtype, device):
    head_shape = (shape[0], 3 * shape[1], *shape[2:])
    return step_inputs(shape, net_dtype, device) + [randn(head_shape, net_dtype, 2, device)]


SPEC = StepOp("genie_step", ops.genie_step_ref, _make,
              lambda a: [(a[0], a[0].dtype), (a[0], a[1].dtype)], inplace=[(0, 0)])
CPU = cpu_backends("genie_step")


class TestGenieStep(StepOpTests):
    """The generic step-op checks (see _fused_checks.StepOpTests)."""

    SPEC = SPEC


def test_wrong_coefficient_is_caught():
    """The reference check can fail: a swapped head weight (w2 <-> w3) is detected."""
    c = coeff_rows()["late"].clone()
    x_bar, eps, head = _make((2, 3, 4, 4), torch.float32, "cpu")
    want = ops.genie_step_ref(x_bar, eps, head, c)
    c[[ops.COL["w2"], ops.COL["w3"]]] = c[[ops.COL["w3"], ops.COL["w2"]]]
    got = ops.genie_step(x_bar, eps, head, c, backend="cpp")
    assert not torch.allclose(got[0], want[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["cpp", "torch"] + (["triton"] if "triton" in CPU else []))
def test_bad_arguments(backend):
    c = coeff_rows()["late"]
    x_bar, eps, head = _make((2, 3, 4, 4), torch.float32, "cpu")
    with pytest.raises(ValueError, match="3\\*C channels"):
        ops.genie_step(x_bar, eps, head[:, :6], c, backend=backend)
    with pytest.raises(ValueError, match="one row of coeff_table"):
        ops.genie_step(x_bar, eps, head, c[:5], backend=backend)


def test_cpp_op_checks():
    c = coeff_rows()["late"]
    x_bar, eps, head = _make((2, 3, 4, 4), torch.float32, "cpu")
    outs = (torch.empty_like(x_bar), torch.empty_like(eps))

    def op(*args):
        torch.ops.genie_fast.genie_step_out(*args, *outs)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        op(x_bar.half(), eps, head, c)
    with pytest.raises(RuntimeError, match="differs from eps dtype"):
        op(x_bar, eps, head.half(), c)
    with pytest.raises(RuntimeError, match="3\\*C channels"):
        op(x_bar, eps, head[:, :6], c)
    with pytest.raises(RuntimeError, match="float64 state needs float64"):
        op(x_bar.double(), eps, head, c)


def test_unknown_or_unavailable_backend():
    c = coeff_rows()["late"]
    args = _make((1, 3, 2, 2), torch.float32, "cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.genie_step(*args, c, backend="cudnn")
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        ops.genie_step(*args, c, backend="cuda")
    assert ops._pick("genie_step", torch.device("cpu"), "auto") == "cpp"


def test_triton_on_cpu_without_interpreter_is_refused():
    """Without TRITON_INTERPRET=1, backend="triton" on CPU tensors fails with a clear reason."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch, genie_fast.ops as o\n"
            "a = torch.zeros(1, 1, 2, 2)\n"
            "try:\n o.ddim_step(a, a, torch.zeros(14), backend='triton')\n"
            "except RuntimeError as e:\n print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


# --------------------------------------------------------------------------- on a GPU
