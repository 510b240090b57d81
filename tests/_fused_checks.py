"""Helpers shared by the fused-op tests (tests/test_<op>.py): inputs, the FlashAttention error
rule against a float64 reference, poisoned outputs, and the backends to test on a device."""
from __future__ import annotations

import pytest
import torch

from genie_fast import ops
from genie_fast.schedule import VPSchedule, coeff_table, time_grid

NET_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# batch 1, odd sizes (C*H*W not a multiple of 4), a no-spatial (B, C) case, a vector-friendly one
SMALL_SHAPES = ((1, 3, 5, 7), (3, 2, 3, 5), (5, 2), (2, 4, 8, 8))
LARGE_SHAPE = (64, 3, 32, 32)
# odd per-sample sizes over more than one kernel block (Triton's BLOCK is 1024): 1311 elements a
# sample (a flat split of the state into blocks would put sample boundaries inside blocks), and
# 2 x 1031 (one element past a block, batch 1: a last block of one element)
BLOCK_SHAPES = ((3, 3, 19, 23), (1, 2, 1031))


def cpu_backends(op: str) -> list[str]:
    """Fused backends (not the reference) that can run `op` on the CPU here."""
    return [b for b in ops.available_backends(op, "cpu") if b != "torch"]


def grid(num_steps: int = 10) -> torch.Tensor:
    """The time grid of the test table (VPSchedule, quadratic)."""
    return time_grid(VPSchedule(), num_steps, "quadratic")


def table(num_steps: int = 10) -> torch.Tensor:
    return coeff_table(VPSchedule(), grid(num_steps))


# Rows with large and small gamma: step 0 (t = 1, x_bar ~ 150 x) and a late step.
ROW_STEPS = {"first": 0, "late": 7}


def coeff_rows(device="cpu"):
    tab = table().to(device)
    return {name: tab[n] for name, n in ROW_STEPS.items()}


def randn(shape, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def state_dtype(net_dtype):
    """The solver state's dtype beside a network of ``net_dtype``: float64 with float64, else float32."""
    return torch.float64 if net_dtype == torch.float64 else torch.float32


def step_inputs(shape, net_dtype, device):
    """[x_bar (state dtype, scale 3), eps (net_dtype)]: the first two arguments of every step op."""
    return [randn(shape, state_dtype(net_dtype), 0, device) * 3, randn(shape, net_dtype, 1, device)]


def poisoned_like(t: torch.Tensor, dtype=None) -> torch.Tensor:
    """An output buffer full of NaN: any element a kernel fails to write stays NaN."""
    return torch.full(t.shape, float("nan"), dtype=dtype or t.dtype, device=t.device)


def assert_fa_rule(name, kernel_out, ref_low, truth, atol_ulps: float = 0.125):
    """FlashAttention's rule: max |kernel - truth| <= 2 max |ref_low - truth| + atol, with truth
    the reference in float64 and ref_low the same reference in the kernel's dtypes.

    atol is `atol_ulps` (default 1/8) units of the output dtype's epsilon at the largest |truth|:
    a floor for the case where the reference happens to round (nearly) exactly. Every element is checked,
    NaN (an unwritten poisoned element) fails.
    """
    assert kernel_out.dtype == ref_low.dtype, f"{name}: dtype {kernel_out.dtype}, reference {ref_low.dtype}"
    assert kernel_out.shape == truth.shape, f"{name}: shape {tuple(kernel_out.shape)}, expected {tuple(truth.shape)}"
    k = kernel_out.double().cpu()
    assert torch.isfinite(k).all(), f"{name}: {int((~torch.isfinite(k)).sum())} non-finite (unwritten?) elements"
    t = truth.double().cpu()
    err_k = (k - t).abs().max().item()
    err_r = (ref_low.double().cpu() - t).abs().max().item()
    atol = atol_ulps * torch.finfo(kernel_out.dtype).eps * t.abs().max().item()
    assert err_k <= 2 * err_r + atol, (
        f"{name}: kernel error {err_k:.3g} > 2 x reference error {err_r:.3g} + atol {atol:.3g}")


def truth_inputs(*tensors):
    """The float64 copies of the (already rounded) inputs: the float64 reference's inputs."""
    return [t.double() for t in tensors]


def call(op: str, backend: str, *args, out=None):
    return getattr(ops, op)(*args, backend=backend, out=out)


def interpreter_bf16(backend: str, device, dtype) -> bool:
    """Triton's interpreter (TRITON_INTERPRET=1, triton 3.6) casts float -> bf16 by truncation, not
    round-to-nearest as Triton on a GPU and torch do: about half the values end 1 ulp off."""
    return backend == "triton" and torch.device(device).type == "cpu" and dtype == torch.bfloat16


def layouts(x: torch.Tensor):
    """The same values as x in other memory layouts: channels_last (4-D) and a strided view."""
    out = {}
    if x.dim() == 4:
        out["channels_last"] = x.contiguous(memory_format=torch.channels_last)
    wide = torch.zeros((*x.shape[:-1], 2 * x.shape[-1]), dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    out["strided"] = wide[..., ::2]
    return out


cuda = pytest.mark.cuda


# --------------------------------------------------------------------------- generic step-op checks

class StepOp:
    """What the generic checks need to know about one fused step op.

    make(shape, net_dtype, device) -> the op's tensor arguments before `coeffs`;
    outs(args) -> [(like, dtype)] of its outputs; inplace: (output index, argument index) pairs
    that may alias (x_bar updated in place, x0_prev overwritten by x0), or (output index,
    argument index, slot) for slot `slot` of a stacked argument (a history written in place);
    at_row(args, row, device) -> the arguments for coefficient row `row` of `coeff_rows` (an op
    whose solver weights belong to the step, such as dpmpp_2m's, gets that step's weights there
    where the reference checks compare against float64; default: the arguments as made).
    """

    def __init__(self, name, ref, make, outs, inplace, at_row=None):
        self.name, self.ref, self.make, self.outs, self.inplace = name, ref, make, outs, inplace
        self.at_row = at_row or (lambda args, row, device: args)

    def results(self, got):
        return (got,) if isinstance(got, torch.Tensor) else tuple(got)


def _bf16_truncate(t: torch.Tensor) -> torch.Tensor:
    bits = t.float().contiguous().view(torch.int32) & ~0xFFFF
    return bits.view(torch.float32).to(torch.bfloat16)


def _reference_low(spec: StepOp, args, c, backend, device, net_dtype):
    """The reference run in the kernel's dtypes, cast to bf16 the way the kernel's runtime casts:
    under Triton's interpreter that is truncation (on a GPU Triton rounds to nearest)."""
    ref_low = spec.results(spec.ref(*args, c))
    if interpreter_bf16(backend, device, net_dtype):
        wide = spec.results(spec.ref(*[a.float() if a.dtype == torch.bfloat16 else a for a in args], c))
        ref_low = tuple(_bf16_truncate(w) if r.dtype == torch.bfloat16 else r for w, r in zip(wide, ref_low))
    return ref_low


def check_against_reference(spec: StepOp, backend, device, shape, net_dtype, row, use_out):
    c = coeff_rows(device)[row]
    args = spec.at_row(spec.make(shape, net_dtype, device), row, device)
    truth = spec.results(spec.ref(*truth_inputs(*args), c.double()))
    ref_low = _reference_low(spec, args, c, backend, device, net_dtype)
    if use_out:
        out = tuple(poisoned_like(like, dtype) for like, dtype in spec.outs(args))
        got = spec.results(call(spec.name, backend, *args, c, out=out))
        assert all(g is o for g, o in zip(got, out)), "out= must return the given buffers"
    else:
        got = spec.results(call(spec.name, backend, *args, c))
    assert len(got) == len(truth)
    for i, (g, r, t) in enumerate(zip(got, ref_low, truth)):
        assert g.is_contiguous()
        assert_fa_rule(f"{spec.name}[{backend}] output {i}", g, r, t)


def check_float64(spec: StepOp, backend, device, shape):
    c = coeff_rows(device)["late"]
    args = spec.at_row(spec.make(shape, torch.float64, device), "late", device)
    truth = spec.results(spec.ref(*args, c))
    got = spec.results(call(spec.name, backend, *args, c))
    for i, (g, t) in enumerate(zip(got, truth)):
        assert g.dtype == torch.float64
        assert_fa_rule(f"{spec.name}[{backend}] float64 output {i}", g, t, t, atol_ulps=4.0)


def check_inplace(spec: StepOp, backend, device, shape, net_dtype):
    c = coeff_rows(device)["late"]
    args = spec.make(shape, net_dtype, device)
    want = spec.results(call(spec.name, backend, *args, c))
    args = [a.clone() for a in args]
    out = [poisoned_like(like, dtype) for like, dtype in spec.outs(args)]
    for o, a, *slot in spec.inplace:
        out[o] = args[a][slot[0]] if slot else args[a]
    got = spec.results(call(spec.name, backend, *args, c, out=tuple(out)))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def check_layouts(spec: StepOp, backend, device, shape, net_dtype):
    """channels_last and strided inputs are handled (same result as contiguous inputs); an argument
    without the layout (channels_last of a stacked history or a weight vector) is strided."""
    c = coeff_rows(device)["late"]
    args = spec.make(shape, net_dtype, device)
    want = spec.results(call(spec.name, backend, *args, c))
    for kind in layouts(args[0]):
        moved = [layouts(a).get(kind, layouts(a)["strided"]) for a in args]
        assert not all(m.is_contiguous() for m in moved)
        got = spec.results(call(spec.name, backend, *moved, c))
        for g, w in zip(got, want):
            assert g.is_contiguous()
            torch.testing.assert_close(g, w, rtol=0, atol=0, msg=f"{kind} inputs")


def check_refuses_strided_out(spec: StepOp, backend, device):
    c = coeff_rows(device)["late"]
    args = spec.make((2, 3, 4, 6), torch.float32, device)
    out = [torch.empty(like.shape, dtype=dtype, device=device) for like, dtype in spec.outs(args)]
    out[0] = torch.empty_like(args[0], memory_format=torch.channels_last)
    with pytest.raises((RuntimeError, ValueError), match="contiguous"):
        call(spec.name, backend, *args, c, out=tuple(out))


def check_opcheck(spec: StepOp, device):
    """torch.library.opcheck of the op's one registered form, `<op>_out` (schema, fake kernel,
    autograd registration, aliasing of the mutated outputs), with a float64 and a float32 row."""
    c = coeff_rows(device)["late"]
    op = getattr(torch.ops.genie_fast, spec.name + "_out")
    assert not hasattr(torch.ops.genie_fast, spec.name), "a step op registers only its `_out` form"
    for net_dtype in NET_DTYPES:
        args = spec.make((2, 3, 4, 5), net_dtype, device)
        for row in (c, c.float()):
            outs = [torch.empty(like.shape, dtype=dtype, device=device) for like, dtype in spec.outs(args)]
            torch.library.opcheck(op.default, (*args, row, *outs))


def check_cuda_graph(spec: StepOp, backend, shape=(4, 3, 16, 16)):
    """The op captured in a CUDA graph with static buffers replays to the eager result, and
    reads the coefficient row from device memory at replay time (a new row, no recapture)."""
    tab = table().cuda()
    row = tab[3].clone()
    args = spec.make(shape, torch.float16, "cuda")
    out = tuple(torch.empty(like.shape, dtype=dtype, device="cuda") for like, dtype in spec.outs(args))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        call(spec.name, backend, *args, row, out=out)  # warm-up (Triton compiles here)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call(spec.name, backend, *args, row, out=out)
    for n in (3, 6):
        row.copy_(tab[n])
        graph.replay()
        want = spec.results(call(spec.name, backend, *args, tab[n]))
        for o, w in zip(out, want):
            torch.testing.assert_close(o, w, rtol=0, atol=0)


FUSED_CPU_BACKENDS = ("cpp", "triton")
FUSED_CUDA_BACKENDS = ("cuda", "triton")


class StepOpTests:
    """The checks every step op gets; a test file subclasses it with `SPEC = StepOp(...)`
    and adds the op's own tests (its formula's pitfalls, argument errors) beside it."""

    SPEC: StepOp

    def _need(self, backend):
        if backend not in cpu_backends(self.SPEC.name):
            pytest.skip(f"backend {backend!r} cannot run {self.SPEC.name} on the CPU here")

    def test_cpp_backend_is_built(self):
        assert "cpp" in cpu_backends(self.SPEC.name), (
            f"genie_fast._C lacks {self.SPEC.name}: rebuild with `pip install --no-build-isolation -e .`")

    @pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
    @pytest.mark.parametrize("net_dtype", NET_DTYPES)
    @pytest.mark.parametrize("shape", SMALL_SHAPES)
    @pytest.mark.parametrize("row", ["first", "late"])
    def test_matches_reference(self, backend, net_dtype, shape, row):
        self._need(backend)
        check_against_reference(self.SPEC, backend, "cpu", shape, net_dtype, row, use_out=False)

    @pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
    @pytest.mark.parametrize("net_dtype", NET_DTYPES)
    def test_poisoned_out(self, backend, net_dtype):
        self._need(backend)
        check_against_reference(self.SPEC, backend, "cpu", (3, 3, 5, 7), net_dtype, "late", use_out=True)

    @pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
    @pytest.mark.parametrize("shape", BLOCK_SHAPES)
    def test_samples_across_blocks(self, backend, shape):
        self._need(backend)
        check_against_reference(self.SPEC, backend, "cpu", shape, torch.float16, "first", use_out=True)

    @pytest.mark.parametrize("net_dtype", NET_DTYPES)
    def test_large_cpp(self, net_dtype):
        check_against_reference(self.SPEC, "cpp", "cpu", LARGE_SHAPE, net_dtype, "late", use_out=True)

    @pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
    def test_float64(self, backend):
        self._need(backend)
        check_float64(self.SPEC, backend, "cpu", (2, 3, 5, 7))

    @pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
    def test_inplace(self, backend):
        self._need(backend)
        check_inplace(self.SPEC, backend, "cpu", (2, 3, 5, 7), torch.float16)

    @pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
    def test_layouts(self, backend):
        self._need(backend)
        check_layouts(self.SPEC, backend, "cpu", (2, 3, 5, 7), torch.bfloat16)

    @pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
    def test_refuses_strided_out(self, backend):
        self._need(backend)
        check_refuses_strided_out(self.SPEC, backend, "cpu")

    def test_opcheck(self):
        check_opcheck(self.SPEC, "cpu")

    @cuda
    @pytest.mark.parametrize("backend", FUSED_CUDA_BACKENDS)
    @pytest.mark.parametrize("net_dtype", NET_DTYPES)
    @pytest.mark.parametrize("shape", SMALL_SHAPES + ((256, 3, 32, 32),))
    @pytest.mark.parametrize("use_out", [False, True])
    def test_cuda_matches_reference(self, backend, net_dtype, shape, use_out):
        check_against_reference(self.SPEC, backend, "cuda", shape, net_dtype, "first", use_out)

    @cuda
    @pytest.mark.parametrize("backend", FUSED_CUDA_BACKENDS)
    @pytest.mark.parametrize("shape", BLOCK_SHAPES)
    def test_cuda_samples_across_blocks(self, backend, shape):
        check_against_reference(self.SPEC, backend, "cuda", shape, torch.float16, "first", use_out=True)

    @cuda
    @pytest.mark.parametrize("backend", FUSED_CUDA_BACKENDS)
    def test_cuda_misc(self, backend):
        check_float64(self.SPEC, backend, "cuda", (2, 3, 5, 7))
        check_inplace(self.SPEC, backend, "cuda", (2, 3, 5, 7), torch.float16)
        check_layouts(self.SPEC, backend, "cuda", (2, 3, 5, 7), torch.bfloat16)
        check_refuses_strided_out(self.SPEC, backend, "cuda")
        check_cuda_graph(self.SPEC, backend)

    @cuda
    def test_cuda_opcheck_and_auto(self):
        check_opcheck(self.SPEC, "cuda")
        assert ops._pick(self.SPEC.name, torch.device("cuda"), "auto") == "cuda"
