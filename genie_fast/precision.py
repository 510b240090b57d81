"""Agreement bounds of the engine's half-precision and graph runs: ONE table, read by the CUDA tests
(tests/test_engine.py), the CPU's bf16 tests (tests/test_cpu_path.py: the bf16 column, per solver,
on CPUs with native bf16), the agreement check (bench/profile_sample.py --check) and any bench or
test that compares a half-precision run with an fp32 one.

Half precision: relative L2 error of x0 with an fp16 / bf16 network against the fp32 network (TF32
off), same noise, float32 ODE state, NFE 10 with the defaults, batch 4. Measured on the CPU with the
solvers called directly on an fp16 / bf16 copy of random-weight U-Nets (PyTorch's default init in
every conv; the engine refuses fp16 on the CPU, and runs bf16 there only where the CPU has it natively):

    PYTHONPATH=. python bench/bench_overhead.py --precision --json bench/results/precision/precision.json

(bench/RESULTS.md, "Half-precision network error per solver"). Largest figure of the tiny and
fmnist_small U-Nets: at most 4.1e-4 (fp16) and 3.3e-3 (bf16) for every solver but genie_exact,
whose JVP in half precision gives 2.6e-3 and 2.0e-2. The bounds are 3.5 to 5 times those: GPU
kernels add up in other orders than the CPU's, and a real fault (a stale buffer, a wrong step, fp16
overflow) gives errors of order 1.

A trained network is another matter: the bundled model's probability-flow trajectories amplify a
perturbation of the network (a sample near a boundary between modes ends elsewhere), so its x0
moves by 1e-2 under fp16 where a random-weight U-Net's moves by 3e-4, and fp16 and bf16 end up
alike (ddim: 1.4e-2 and 1.5e-2; the network's own eps error is 4e-4 and 3e-3). Its bounds are a
second table, `BUNDLED_HALF_PRECISION_BOUNDS` (``half_bounds(solver, "default")``), measured with
the settings of the agreement check `bench/profile_sample.py --check --model default --batch 8
--nfe 10` (its noise, quadratic grid, no AFS, no denoising):

    PYTHONPATH=. python bench/bench_overhead.py --precision --bundled \\
        --json bench/results/precision/precision_bundled.json

and set to 4 times the measured figure, rounded up to two digits (GPU kernels round elsewhere and
the trajectories amplify that too). These bounds only tell a run that stays on the fp32 run's
samples from one that does not: the two-evaluation single-step solvers at 5 steps move most
(bf16: heun 0.35, dpm_solver_2 0.14, samples ending in another mode; bounds 1.5 and 0.54, which a
fault would pass too). The sensitive check of every solver's half-precision path is the
random-weight table above (tests/test_engine.py's CUDA tests, profile_sample on a random U-Net).

Graph against eager: the captured graph runs the same kernels as the eager loop, so with an fp32
network (TF32 off) they agree to a few float32 ulps (`GRAPH_VS_EAGER_FP32_BOUND`); with a
half-precision network both sides round the same way and the bound is a tenth of the solver's
half-precision bound (`GRAPH_VS_EAGER_HALF_FRACTION`).
"""
from __future__ import annotations

__all__ = ["HALF_PRECISION_BOUNDS", "BUNDLED_HALF_PRECISION_BOUNDS", "BUNDLED_MEASURED", "MODEL_TABLES",
           "half_bounds", "GRAPH_VS_EAGER_FP32_BOUND", "GRAPH_VS_EAGER_HALF_FRACTION", "graph_vs_eager_half_bound"]

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

# The bundled model (`genie_fast.models.load_default`, the check's --model default): relative L2
# error of x0 over the check's batch of 8, fp16 / bf16 network against fp32 (bench_overhead.py
# --precision --bundled; bench/results/precision/precision_bundled.json).
BUNDLED_MEASURED: dict[str, tuple[float, float]] = {
    "ddim": (1.43e-02, 1.48e-02),
    "genie": (3.27e-03, 1.72e-02),
    "genie_exact": (1.32e-02, 8.97e-02),
    "heun": (4.57e-02, 3.54e-01),
    "dpm_solver_2": (1.72e-02, 1.35e-01),
    "dpmpp_2m": (6.19e-03, 4.24e-02),
    "dpmpp_3m": (2.58e-03, 1.73e-02),
    "unipc": (2.60e-03, 1.55e-02),
    "ipndm": (3.63e-03, 1.40e-02),
    "genie_multistep": (2.39e-03, 1.30e-02),
}
BUNDLED_MARGIN = 4.0


def _bound(measured: float) -> float:
    """BUNDLED_MARGIN times a measured figure, rounded up to two significant digits."""
    import math

    x = BUNDLED_MARGIN * measured
    scale = 10.0 ** (math.floor(math.log10(x)) - 1)
    return float(f"{math.ceil(x / scale - 1e-9) * scale:.2g}")


BUNDLED_HALF_PRECISION_BOUNDS: dict[str, tuple[float, float]] = {
    solver: (_bound(fp16), _bound(bf16)) for solver, (fp16, bf16) in BUNDLED_MEASURED.items()}

# model name (as bench/profile_sample.py and bench/bench_sample.py name models) -> its table; any
# other model (random-weight U-Nets: tiny, fmnist_small, deep) -> HALF_PRECISION_BOUNDS
MODEL_TABLES: dict[str, dict[str, tuple[float, float]]] = {"default": BUNDLED_HALF_PRECISION_BOUNDS}

GRAPH_VS_EAGER_FP32_BOUND = 1e-5
GRAPH_VS_EAGER_HALF_FRACTION = 0.1


def half_bounds(solver: str, model: str | None = None) -> tuple[float, float]:
    """(fp16, bf16) relative-L2 bounds of `solver`'s x0 against the fp32 network's. model: a name of
    `MODEL_TABLES` ("default": the bundled model) for its own table; None or any other name: the
    random-weight U-Nets' `HALF_PRECISION_BOUNDS`."""
    table, name = MODEL_TABLES.get(model, HALF_PRECISION_BOUNDS), (
        "BUNDLED_MEASURED" if model in MODEL_TABLES else "HALF_PRECISION_BOUNDS")
    try:
        return table[solver]
    except KeyError:
        raise KeyError(f"no half-precision bounds for solver {solver!r}: measure them "
                       f"(bench/bench_overhead.py --precision{' --bundled' if model in MODEL_TABLES else ''}) and "
                       f"add a row to genie_fast.precision.{name}") from None


def graph_vs_eager_half_bound(solver: str, model: str | None = None) -> float:
    """Bound of a half-precision graph run against the eager run in the same dtype."""
    return GRAPH_VS_EAGER_HALF_FRACTION * half_bounds(solver, model)[0]
