"""Agreement bounds of the engine's half-precision and graph runs: ONE table, read by the CUDA tests
(tests/test_engine.py), the agreement check (bench/profile_sample.py --check) and any bench or test
that compares a half-precision run with an fp32 one.

Half precision: relative L2 error of x0 with an fp16 / bf16 network against the fp32 network (TF32
off), same noise, float32 ODE state, NFE 10 with the defaults, batch 4. Measured on the CPU with the
solvers called directly on an fp16 / bf16 copy of random-weight U-Nets (PyTorch's default init in
every conv; the engine refuses half precision on the CPU):

    PYTHONPATH=. python bench/bench_overhead.py --precision --json bench/results/precision.json

(bench/RESULTS.md, "Half-precision network error per solver"). Largest figure of the tiny and
fmnist_small U-Nets: at most 4.1e-4 (fp16) and 3.3e-3 (bf16) for every solver but genie_exact,
whose JVP in half precision gives 2.6e-3 and 2.0e-2. The bounds are 3.5 to 5 times those: GPU
kernels add up in other orders than the CPU's, and a real fault (a stale buffer, a wrong step, fp16
overflow) gives errors of order 1.

Graph against eager: the captured graph runs the same kernels as the eager loop, so with an fp32
network (TF32 off) they agree to a few float32 ulps (`GRAPH_VS_EAGER_FP32_BOUND`); with a
half-precision network both sides round the same way and the bound is a tenth of the solver's
half-precision bound (`GRAPH_VS_EAGER_HALF_FRACTION`).
"""
from __future__ import annotations

__all__ = ["HALF_PRECISION_BOUNDS", "half_bounds", "GRAPH_VS_EAGER_FP32_BOUND", "GRAPH_VS_EAGER_HALF_FRACTION",
           "graph_vs_eager_half_bound"]

_SHARED = (2e-3, 1.6e-2)  # 5x the largest figure of the solvers without a JVP

# solver -> (fp16 bound, bf16 bound); every solver of genie_fast.solvers.SOLVERS has a row (tested)
HALF_PRECISION_BOUNDS: dict[str, tuple[float, float]] = {
    "ddim": _SHARED,              # measured 3.3e-4 / 2.7e-3
    "genie": _SHARED,             # 3.5e-4 / 3.0e-3
    "genie_exact": (9e-3, 7e-2),  # 2.6e-3 / 2.0e-2 (the JVP in half precision): 3.5x
    "heun": _SHARED,              # 3.3e-4 / 2.6e-3
    "dpm_solver_2": _SHARED,      # 4.1e-4 / 3.2e-3
    "dpmpp_2m": _SHARED,          # 2.8e-4 / 2.2e-3
    "dpmpp_3m": _SHARED,          # 2.7e-4 / 2.2e-3
    "unipc": _SHARED,             # 2.8e-4 / 2.2e-3
    "ipndm": _SHARED,             # 3.2e-4 / 2.7e-3
    "genie_multistep": _SHARED,   # 2.8e-4 / 2.3e-3
}

GRAPH_VS_EAGER_FP32_BOUND = 1e-5
GRAPH_VS_EAGER_HALF_FRACTION = 0.1


def half_bounds(solver: str) -> tuple[float, float]:
    """(fp16, bf16) relative-L2 bounds of `solver`'s x0 against the fp32 network's."""
    try:
        return HALF_PRECISION_BOUNDS[solver]
    except KeyError:
        raise KeyError(f"no half-precision bounds for solver {solver!r}: measure them "
                       f"(bench/bench_overhead.py --precision) and add a row to "
                       f"genie_fast.precision.HALF_PRECISION_BOUNDS") from None


def graph_vs_eager_half_bound(solver: str) -> float:
    """Bound of a half-precision graph run against the eager run in the same dtype."""
    return GRAPH_VS_EAGER_HALF_FRACTION * half_bounds(solver)[0]
