"""genie_step: every fused backend against the float64 reference (FlashAttention's rule), with
poisoned outputs, odd shapes, batch 1, layouts, in-place updates, opcheck and CUDA graphs."""
import pytest
import torch

from genie_fast import ops
from _fused_checks import (LARGE_SHAPE, NET_DTYPES, SMALL_SHAPES, StepOp, check_against_reference,
                           check_cuda_graph, check_float64, check_inplace, check_layouts, check_opcheck,
                           check_refuses_strided_out, coeff_rows, cpu_backends, cuda, randn)


def _make(shape, net_dtype, device):
    state = torch.float64 if net_dtype == torch.float64 else torch.float32
    head_shape = (shape[0], 3 * shape[1], *shape[2:])
    return [randn(shape, state, 0, device) * 3, randn(shape, net_dtype, 1, device),
            randn(head_shape, net_dtype, 2, device)]


SPEC = StepOp("genie_step", ops.genie_step_ref, _make,
              lambda a: [(a[0], a[0].dtype), (a[0], a[1].dtype)], inplace=[(0, 0)])
CPU = cpu_backends("genie_step")


def test_cpp_backend_is_built():
    assert "cpp" in CPU, "genie_fast._C lacks genie_step: rebuild with `pip install --no-build-isolation -e .`"


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("net_dtype", NET_DTYPES)
@pytest.mark.parametrize("shape", SMALL_SHAPES)
@pytest.mark.parametrize("row", ["first", "late"])
def test_matches_reference(backend, net_dtype, shape, row):
    check_against_reference(SPEC, backend, "cpu", shape, net_dtype, row, use_out=False)


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("net_dtype", NET_DTYPES)
def test_poisoned_out(backend, net_dtype):
    check_against_reference(SPEC, backend, "cpu", (3, 3, 5, 7), net_dtype, "late", use_out=True)


@pytest.mark.parametrize("net_dtype", NET_DTYPES)
def test_large_cpp(net_dtype):
    check_against_reference(SPEC, "cpp", "cpu", LARGE_SHAPE, net_dtype, "late", use_out=True)


@pytest.mark.parametrize("backend", CPU)
def test_float64(backend):
    check_float64(SPEC, backend, "cpu", (2, 3, 5, 7))


@pytest.mark.parametrize("backend", CPU)
def test_inplace(backend):
    check_inplace(SPEC, backend, "cpu", (2, 3, 5, 7), torch.float16)


@pytest.mark.parametrize("backend", CPU)
def test_layouts(backend):
    check_layouts(SPEC, backend, "cpu", (2, 3, 5, 7), torch.bfloat16)


@pytest.mark.parametrize("backend", CPU)
def test_refuses_strided_out(backend):
    check_refuses_strided_out(SPEC, backend, "cpu")


def test_opcheck():
    check_opcheck(SPEC, "cpu")


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
    op = torch.ops.genie_fast.genie_step
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

CUDA_BACKENDS = ["cuda", "triton"]


@cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("net_dtype", NET_DTYPES)
@pytest.mark.parametrize("shape", SMALL_SHAPES + ((256, 3, 32, 32),))
@pytest.mark.parametrize("use_out", [False, True])
def test_cuda_matches_reference(backend, net_dtype, shape, use_out):
    check_against_reference(SPEC, backend, "cuda", shape, net_dtype, "first", use_out)


@cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_misc(backend):
    check_float64(SPEC, backend, "cuda", (2, 3, 5, 7))
    check_inplace(SPEC, backend, "cuda", (2, 3, 5, 7), torch.float16)
    check_layouts(SPEC, backend, "cuda", (2, 3, 5, 7), torch.bfloat16)
    check_refuses_strided_out(SPEC, backend, "cuda")
    check_cuda_graph(SPEC, backend)


@cuda
def test_cuda_opcheck_and_auto():
    check_opcheck(SPEC, "cuda")
    assert ops._pick("genie_step", torch.device("cuda"), "auto") == "cuda"
