"""genie_multistep_step: genie_multistep's corrector and predictor at one network evaluation.

Every fused backend against the float64 reference (FlashAttention's rule), with poisoned
outputs, odd shapes, batch 1, layouts, in-place updates, opcheck and CUDA graphs; then what is
particular to this op: the history written in place (x0 into one x0_hist slot, d into one d_hist
slot, while every slot is read), the weight layout, weights in any float dtype, argument errors."""
import pytest
import torch

from genie_fast import ops
from _fused_checks import (StepOpTests, StepOp, coeff_rows, cpu_backends, cuda, poisoned_like, randn, state_dtype,
                           step_inputs)

OP = "genie_multistep_step"
X0_SLOTS, D_SLOTS, N_WEIGHTS = ops.MULTISTEP_X0_SLOTS, ops.MULTISTEP_D_SLOTS, ops.MULTISTEP_WEIGHTS


def _make(shape, net_dtype, device, weights_dtype=torch.float64):
    """x_bar, x_bar_eval, eps, head_out, x0_hist, d_hist, weights (random: every term counts)."""
    st = state_dtype(net_dtype)
    x_bar, eps = step_inputs(shape, net_dtype, device)
    head_shape = (shape[0], 3 * shape[1], *shape[2:])
    return [x_bar, randn(shape, st, 2, device) * 3, eps, randn(head_shape, net_dtype, 3, device),
            randn((X0_SLOTS, *shape), st, 4, device), randn((D_SLOTS, *shape), st, 5, device),
            randn((N_WEIGHTS,), torch.float64, 6, device).to(weights_dtype)]


def _outs(a):
    return [(a[0], a[0].dtype), (a[0], a[0].dtype), (a[0], a[2].dtype), (a[0], a[0].dtype), (a[0], a[0].dtype)]


# x_bar_next over x_bar, x_bar_pred over x_bar_eval, x_pred over eps, x0 and d into the last slots
SPEC = StepOp(OP, ops.genie_multistep_step_ref, _make, _outs,
              inplace=[(0, 0), (1, 1), (2, 2), (3, 4, X0_SLOTS - 1), (4, 5, D_SLOTS - 1)])
CPU = cpu_backends(OP)
ALL_CPU = ["torch"] + CPU


class TestGenieMultistepStep(StepOpTests):
    """The generic step-op checks (see _fused_checks.StepOpTests)."""

    SPEC = SPEC


def _check_history_in_place(backend, device, shape, net_dtype):
    """x0 written into x0_hist[k] and d into d_hist[j], for every pair of slots, with the other
    outputs over x_bar, x_bar_eval and eps too: the result is that of fresh outputs, although
    every slot (the overwritten one included) has a nonzero weight in both sums."""
    c = coeff_rows(device)["late"]
    args = _make(shape, net_dtype, device)
    assert (args[6] != 0).all()
    want = ops.genie_multistep_step(*args, c, backend=backend)
    for k in range(X0_SLOTS):
        for j in range(D_SLOTS):
            a = [t.clone() for t in args]
            x0_hist, d_hist = a[4], a[5]
            out = (a[0], a[1], a[2], x0_hist[k], d_hist[j])
            got = ops.genie_multistep_step(*a, c, backend=backend, out=out)
            assert all(g is o for g, o in zip(got, out))
            for i, (g, w) in enumerate(zip(got, want)):
                torch.testing.assert_close(g, w, rtol=0, atol=0, msg=f"slots {k}, {j}: output {i}")
            # the slots not written keep their values
            for kk in range(X0_SLOTS):
                if kk != k:
                    assert torch.equal(x0_hist[kk], args[4][kk])
            for jj in range(D_SLOTS):
                if jj != j:
                    assert torch.equal(d_hist[jj], args[5][jj])


@pytest.mark.parametrize("backend", ALL_CPU)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (2, 4, 8, 8)])  # odd sizes, and one the vector paths take
def test_history_written_in_place(backend, shape):
    _check_history_in_place(backend, "cpu", shape, torch.float16)


@pytest.mark.parametrize("backend", ALL_CPU)
def test_outputs_over_one_history_buffer(backend):
    """Every state output written into a history slot while all slots are read (x_bar_next and x0
    into x0_hist[2] and x0_hist[0], x_bar_pred and d into d_hist[0] and d_hist[1]): the result of
    fresh outputs, and the slot not written (x0_hist[1]) unchanged."""
    c = coeff_rows()["late"]
    args = _make((2, 3, 4, 4), torch.float32, "cpu")
    want = ops.genie_multistep_step(*args, c, backend=backend)
    a = [t.clone() for t in args]
    x0_hist, d_hist = a[4], a[5]
    out = (x0_hist[2], d_hist[0], torch.empty_like(a[2]), x0_hist[0], d_hist[1])
    got = ops.genie_multistep_step(*a, c, backend=backend, out=out)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=f"output {i}")
    assert torch.equal(x0_hist[1], args[4][1])


@pytest.mark.parametrize("backend", ALL_CPU)
def test_weight_layout(backend):
    """The weight row's layout, as the reference documents it (T = [base, x0, d, X0, X1, X2, D0, D1]):
    w[i] = 1 alone (i < 8) makes x_bar_next term i (base x_bar) and x_bar_pred 0; with w[1] = 1
    (x_bar_next = x0), w[8 + i] = 1 makes x_bar_pred term i (base x_bar_next); x_pred = w[16] x_bar_pred."""
    c = coeff_rows()["late"]
    args = _make((2, 3, 4, 4), torch.float32, "cpu")
    x_bar, x_bar_eval, eps, head, x0_hist, d_hist, _ = args
    zero = torch.zeros_like(x_bar)
    k = ops.MULTISTEP_TERMS
    for i in range(2 * k):
        w = torch.zeros(N_WEIGHTS, dtype=torch.float64)
        w[2 * k] = 0.5
        w[i] = 1.0
        if i >= k:
            w[1] = 1.0
        nxt, pred, x_pred, x0, d = ops.genie_multistep_step(*args[:6], w, c, backend=backend)
        if i < k:
            want_next, want_pred = [x_bar, x0, d, *x0_hist, *d_hist][i], zero
        else:
            want_next, want_pred = x0, [x0, x0, d, *x0_hist, *d_hist][i - k]
        torch.testing.assert_close(nxt, want_next, rtol=0, atol=0, msg=f"weight {i}: x_bar_next")
        torch.testing.assert_close(pred, want_pred, rtol=0, atol=0, msg=f"weight {i}: x_bar_pred")
        torch.testing.assert_close(x_pred, 0.5 * pred, rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("weights_dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_weights_any_float_dtype(backend, weights_dtype):
    """Weights in any float dtype (and strided) are read in the state's math type."""
    c = coeff_rows()["late"]
    args = _make((2, 3, 5, 7), torch.float32, "cpu", weights_dtype=weights_dtype)
    want = ops.genie_multistep_step_ref(*args, c)
    wide = torch.zeros(2 * N_WEIGHTS, dtype=weights_dtype)
    wide[::2] = args[6]
    for w in (args[6], wide[::2]):
        got = ops.genie_multistep_step(*args[:6], w, c, backend=backend)
        for i, (g, r) in enumerate(zip(got, want)):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-4, msg=f"output {i}")


def test_wrong_coefficient_is_caught():
    """gamma enters x0 and d: the row of another step changes the result."""
    tab = coeff_rows()
    args = _make((2, 3, 4, 4), torch.float32, "cpu")
    want = ops.genie_multistep_step_ref(*args, tab["late"])
    got = ops.genie_multistep_step(*args, tab["first"], backend="cpp")
    for i in (0, 1, 3, 4):
        assert not torch.allclose(got[i], want[i], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ALL_CPU)
def test_bad_arguments(backend):
    c = coeff_rows()["late"]
    x_bar, x_bar_eval, eps, head, x0_hist, d_hist, w = _make((2, 3, 4, 4), torch.float32, "cpu")
    with pytest.raises(ValueError, match="x0_hist must have shape"):
        ops.genie_multistep_step(x_bar, x_bar_eval, eps, head, x0_hist[:2], d_hist, w, c, backend=backend)
    with pytest.raises(ValueError, match="d_hist must have shape"):
        ops.genie_multistep_step(x_bar, x_bar_eval, eps, head, x0_hist, x0_hist, w, c, backend=backend)
    with pytest.raises(ValueError, match="weights must be 17 values"):
        ops.genie_multistep_step(x_bar, x_bar_eval, eps, head, x0_hist, d_hist, w[:16], c, backend=backend)
    with pytest.raises(ValueError, match="x_bar_eval"):
        ops.genie_multistep_step(x_bar, x_bar_eval[:1], eps, head, x0_hist, d_hist, w, c, backend=backend)
    with pytest.raises(ValueError, match="3\\*C channels"):
        ops.genie_multistep_step(x_bar, x_bar_eval, eps, head[:, :6], x0_hist, d_hist, w, c, backend=backend)
    with pytest.raises(ValueError, match="one row of coeff_table"):
        ops.genie_multistep_step(x_bar, x_bar_eval, eps, head, x0_hist, d_hist, w, c[:5], backend=backend)
    with pytest.raises(ValueError, match="out must hold 5"):
        ops.genie_multistep_step(x_bar, x_bar_eval, eps, head, x0_hist, d_hist, w, c, backend=backend,
                                 out=(x_bar, x_bar_eval))


def test_cpp_op_checks():
    c = coeff_rows()["late"]
    args = _make((2, 3, 4, 4), torch.float32, "cpu")
    x_bar, x_bar_eval, eps, head, x0_hist, d_hist, w = args
    fresh = [torch.empty(like.shape, dtype=dt) for like, dt in _outs(args)]

    def op(*a):
        torch.ops.genie_fast.genie_multistep_step_out(*a, *fresh)
    with pytest.raises(RuntimeError, match="x0_hist must have shape"):
        op(x_bar, x_bar_eval, eps, head, x0_hist[:2], d_hist, w, c)
    with pytest.raises(RuntimeError, match="d_hist must have shape"):
        op(x_bar, x_bar_eval, eps, head, x0_hist, d_hist[:, :1], w, c)
    with pytest.raises(RuntimeError, match="x0_hist dtype"):
        op(x_bar, x_bar_eval, eps, head, x0_hist.double(), d_hist, w, c)
    with pytest.raises(RuntimeError, match="x_bar_eval dtype"):
        op(x_bar, x_bar_eval.double(), eps, head, x0_hist, d_hist, w, c)
    with pytest.raises(RuntimeError, match="weights must be 17 values"):
        op(x_bar, x_bar_eval, eps, head, x0_hist, d_hist, w.view(1, 17), c)
    with pytest.raises(RuntimeError, match="weights must be float64, float32"):
        op(x_bar, x_bar_eval, eps, head, x0_hist, d_hist, w.long(), c)
    with pytest.raises(RuntimeError, match="differs from eps dtype"):
        op(x_bar, x_bar_eval, eps, head.half(), x0_hist, d_hist, w, c)
    outs = [torch.empty(like.shape, dtype=dt) for like, dt in _outs(args)]
    outs[4] = torch.empty_like(x_bar, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="output d has dtype"):
        torch.ops.genie_fast.genie_multistep_step_out(*args, c, *outs)


@pytest.mark.skipif("triton" not in CPU, reason="Triton unavailable on the CPU here")
def test_triton_launcher_checks():
    from genie_fast.kernels import genie_multistep_step as launch

    c = coeff_rows()["late"]
    args = _make((2, 3, 4, 4), torch.float32, "cpu")
    x_bar, x_bar_eval, eps, head, x0_hist, d_hist, w = args
    outs = [poisoned_like(like, dt) for like, dt in _outs(args)]
    with pytest.raises(TypeError, match="d_hist dtype"):
        launch(x_bar, x_bar_eval, eps, head, x0_hist, d_hist.double(), w, c, *outs)
    with pytest.raises(TypeError, match="weights must be float64"):
        launch(x_bar, x_bar_eval, eps, head, x0_hist, d_hist, w.int(), c, *outs)
    outs[3] = poisoned_like(x_bar, torch.float64)
    with pytest.raises(ValueError, match="output x0 must be"):
        launch(x_bar, x_bar_eval, eps, head, x0_hist, d_hist, w, c, *outs)


# --------------------------------------------------------------------------- on a GPU

@cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (4, 3, 16, 16)])
def test_cuda_history_written_in_place(backend, shape):
    _check_history_in_place(backend, "cuda", shape, torch.float16)


@cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("weights_dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_cuda_weights_any_float_dtype(backend, weights_dtype):
    c = coeff_rows("cuda")["late"]
    args = _make((4, 3, 16, 16), torch.float16, "cuda", weights_dtype=weights_dtype)
    want = ops.genie_multistep_step_ref(*args, c)
    got = ops.genie_multistep_step(*args, c, backend=backend)
    for i, (g, r) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-3, msg=f"output {i}")


# --------------------------------------------------------------------------- 64-bit history offsets

try:  # (conftest has set TRITON_INTERPRET on a machine without a GPU: the kernels import after it)
    import triton
    import triton.language as tl

    from genie_fast.kernels.genie_multistep_step import history_slot
except ImportError:  # pragma: no cover - Triton is a dependency where the kernels are tested
    triton = None

if triton is not None:
    # The history offsets as the op's kernel computes them (its jitted helper), and computed in n's
    # own 32-bit type (the kernel before the fix). n is only an argument: nothing n-sized exists.
    @triton.jit
    def _helper_offsets(out_ptr, n, SLOT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK).to(tl.int64)
        tl.store(out_ptr + offs, history_slot(SLOT, n, offs))

    @triton.jit
    def _i32_offsets(out_ptr, n, SLOT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK).to(tl.int64)
        tl.store(out_ptr + offs, SLOT * n + offs)


SLOT_NS = [2 ** 30 + 3, 2 ** 31 - 5, 2 ** 31 + 7, 3 * 2 ** 31]


@pytest.mark.skipif(triton is None, reason="needs Triton")
@pytest.mark.parametrize("n", SLOT_NS)
def test_history_slot_offsets_are_64_bit(n):
    """Slot k of element i sits at k n + i: from n = 2**30 on (n arrives as i32 below 2**31), the
    slot offset must not wrap. The same computation in n's 32-bit type does wrap (so the check
    can fail: it did on the kernel's `x0_hist_ptr + 2 * n + offs`)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    block = 16
    want = torch.arange(block, dtype=torch.int64)
    for slot in (1, 2):
        out = torch.empty(block, dtype=torch.int64, device=dev)
        _helper_offsets[(1,)](out, n, SLOT=slot, BLOCK=block)
        assert torch.equal(out.cpu(), slot * n + want), (slot, n)
    if n < 2 ** 31 and dev == "cpu":  # (compiled, LLVM may keep the 32-bit product exact: no wrap to show)
        out = torch.empty(block, dtype=torch.int64, device=dev)
        _i32_offsets[(1,)](out, n, SLOT=2, BLOCK=block)
        assert not torch.equal(out.cpu(), 2 * n + want)  # the 32-bit form wraps: the test above can fail


@cuda
@pytest.mark.parametrize("n", SLOT_NS)
def test_cuda_history_slot_offsets_are_64_bit(n):
    """The same, compiled for the GPU (part of the `-m cuda` run)."""
    test_history_slot_offsets_are_64_bit(n)
