"""denoise_step: the final denoising step x0 = x_bar - gamma_next eps.

Every fused backend against the float64 reference (FlashAttention's rule), with poisoned
outputs, odd shapes, batch 1, layouts, in-place updates, opcheck and CUDA graphs."""
import pytest
import torch

from genie_fast import ops
from _fused_checks import (LARGE_SHAPE, NET_DTYPES, SMALL_SHAPES, StepOp, check_against_reference,
                           check_cuda_graph, check_float64, check_inplace, check_layouts, check_opcheck,
                           check_refuses_strided_out, coeff_rows, cpu_backends, cuda, randn)


def _make(shape, net_dtype, device):
    state = torch.float64 if net_dtype == torch.float64 else torch.float32
    return [randn(shape, state, 0, device) * 3, randn(shape, net_dtype, 1, device)]


SPEC = StepOp("denoise_step", ops.denoise_step_ref, _make,
              lambda a: [(a[0], a[0].dtype)],
              inplace=[(0, 0)])
CPU = cpu_backends("denoise_step")


def test_cpp_backend_is_built():
    assert "cpp" in CPU, "genie_fast._C lacks denoise_step: rebuild with `pip install --no-build-isolation -e .`"


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
    """Denoising must use gamma at the END of the step (gamma_next), not gamma_n."""
    c = coeff_rows()["late"]
    x_bar, eps = _make((2, 3, 4, 4), torch.float32, "cpu")
    wrong = x_bar - c[ops.COL["gamma"]].float() * eps
    for backend in CPU:
        got = ops.denoise_step(x_bar, eps, c, backend=backend)
        assert not torch.allclose(got, wrong, rtol=1e-4, atol=0)

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
    assert ops._pick("denoise_step", torch.device("cuda"), "auto") == "cuda"
