"""The sampling run to put under Nsight Systems or Nsight Compute, and the engine's agreement check.

Profile (after warm-up and capture, the measured calls sit between cudaProfilerStart/Stop, each
call inside an NVTX range ``sample``; eager calls hold ``step`` > ``network`` > ``head`` and
``update`` ranges, graph calls one ``replay`` range). The ranges come from the ``nvtx`` package
(domain ``genie_fast``) or, where it is missing, from ``torch.cuda.nvtx`` (NVTX's default domain):
the run prints which emitted them and the ``--nvtx-include`` filter that selects them.

    # timeline, NVTX ranges and kernels (Nsight Systems)
    nsys profile -t cuda,nvtx --capture-range=cudaProfilerApi -o genie_sample \\
        python bench/profile_sample.py --model deep --batch 16 --nfe 10 --mode both
    nsys stats --report nvtx_sum,cuda_gpu_kern_sum genie_sample.nsys-rep

    # kernels of the sampling calls only (Nsight Compute; push/pop ranges need the trailing "/";
    # with torch.cuda.nvtx as the emitter the filter is "sample/")
    ncu --nvtx --nvtx-include "genie_fast@sample/" --profile-from-start off --clock-control none \\
        --set basic -o genie_sample python bench/profile_sample.py --model deep --batch 16 --mode graph

Check (every solver of genie_fast.solvers.SOLVERS with --solver all; a solver the engine refuses
is a recorded skip; exits 1 when a bound is broken or a solver fails):

    python bench/profile_sample.py --check --model default --solver all --batch 8 --json checks.jsonl

On CUDA: graph vs eager with the same kernels (fp32, fp16), fp16 and bf16 graphs against fp32
eager with TF32 off. On the CPU the engine is eager: bf16 against fp32 only, the graph checks are
recorded as skipped, and the ranges are no-ops unless a tool is attached.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sample import engine_sample, load_models, op_backends  # noqa: E402
from genie_fast.devices import no_tf32  # noqa: E402
from genie_fast.engine import SamplingEngine  # noqa: E402

from genie_fast import profiling  # noqa: E402
from genie_fast.precision import GRAPH_VS_EAGER_FP32_BOUND, graph_vs_eager_half_bound, half_bounds  # noqa: E402
from genie_fast.solvers import SOLVERS  # noqa: E402

CUDA = torch.cuda.is_available()


def check_bounds(solver: str, model: str | None = None) -> dict[str, float]:
    """The bound of each agreement check of `solver` on `model` (a --model name): genie_fast.precision's
    per-solver tables (the one the CUDA tests use for random-weight U-Nets, the bundled model's own
    for "default"; where each was measured is written there)."""
    fp16, bf16 = half_bounds(solver, model)
    return {"graph fp32 vs eager fp32": GRAPH_VS_EAGER_FP32_BOUND,
            "graph fp16 vs eager fp16": graph_vs_eager_half_bound(solver, model),
            "graph fp16 vs eager fp32": fp16,
            "graph bf16 vs eager fp32": bf16,
            "eager bf16 vs eager fp32": bf16}


def _profiler(start: bool):
    if CUDA:
        (torch.cuda.cudart().cudaProfilerStart if start else torch.cuda.cudart().cudaProfilerStop)()


def rel(x, ref):
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def run_profile(model, args, dev):
    shape = model.image_shape
    z = torch.randn((args.batch, *shape), generator=torch.Generator().manual_seed(0)).to(dev)
    modes = ["eager", "graph"] if args.mode == "both" else [args.mode]
    if not CUDA and "graph" in modes:
        print("profile_sample: no CUDA GPU, so no graph mode; running eagerly")
        modes = ["eager"]
    info = profiling.emitter_info()
    print(f"NVTX emitter: {info['emitter']} ({info['why']}); ncu filter of the sample range: "
          f"{info['ncu_filter_sample']}")
    dtype = args.dtype or ("fp16" if CUDA else "fp32")
    engines = {m: SamplingEngine(model, device=dev, net_dtype=dtype, use_graphs=(m == "graph")) for m in modes}
    for m, eng in engines.items():  # warm-up, weight copies and capture outside the profiled region
        for _ in range(2):
            engine_sample(eng, z, args.solver, args.nfe)
    if CUDA:
        torch.cuda.synchronize()
    _profiler(True)
    for m, eng in engines.items():
        for i in range(args.iters):
            t0 = time.perf_counter()
            engine_sample(eng, z, args.solver, args.nfe)
            if CUDA:
                torch.cuda.synchronize()
            print(f"{m} call {i}: {(time.perf_counter() - t0) * 1e3:.3f} ms (host clock, synchronized)")
    _profiler(False)
    for m, eng in engines.items():
        print(f"{m}: {eng.cache_info()}")
    print(f"op backends: {op_backends(dev, 'auto')}")


def _solvers(arg: str) -> list[str]:
    return list(SOLVERS) if arg == "all" else [arg]


def run_check(model, args, dev, emit) -> int:
    """Agreement of the engine's runs for every solver asked for; one JSON record per check.

    On CUDA: graph fp32 vs eager fp32, graph fp16 vs eager fp16, graph fp16 and graph bf16 vs eager
    fp32 (TF32 off). On the CPU (no graphs): eager bf16 vs eager fp32 only, the graph checks are
    recorded as skipped.
    """
    shape = model.image_shape
    z = torch.randn((args.batch, *shape), generator=torch.Generator().manual_seed(5)).to(dev)
    failures = 0
    for solver in _solvers(args.solver):
        base = {"model": args.model, "batch": args.batch, "nfe": args.nfe, "solver": solver,
                "device": str(dev)}
        try:
            with no_tf32():
                run = lambda dt, graphs: engine_sample(  # noqa: E731
                    SamplingEngine(model, device=dev, net_dtype=dt, use_graphs=graphs), z, solver, args.nfe)[0]
                if not CUDA:  # the engine may refuse a half-precision network on the CPU: try that first
                    try:
                        low = run(torch.bfloat16, False)
                    except (ValueError, TypeError) as e:
                        emit({"check": "skip", **base, "reason": f"eager bf16 on the CPU: {type(e).__name__}: "
                                                                 f"{str(e)[:160]}"})
                        continue
                ref = run(torch.float32, False)
                if CUDA:
                    e16 = run(torch.float16, False)
                    g16_eng = SamplingEngine(model, device=dev, net_dtype=torch.float16)
                    g16 = engine_sample(g16_eng, z, solver, args.nfe)[0]
                    checks = [("graph fp32 vs eager fp32", lambda: run(torch.float32, True), ref),
                              ("graph fp16 vs eager fp16", lambda: g16, e16),
                              ("graph fp16 vs eager fp32", lambda: g16, ref),
                              ("graph bf16 vs eager fp32", lambda: run(torch.bfloat16, True), ref)]
                else:
                    checks = [("eager bf16 vs eager fp32", lambda: low, ref)]
                    emit({"check": "skip", **base, "reason": "no CUDA GPU: graph checks not run"})
                bounds = check_bounds(solver, args.model)
                for name, get, against in checks:
                    bound = bounds[name]
                    x = get()
                    finite = bool(torch.isfinite(x).all())
                    err = rel(x, against)
                    ok = finite and err < bound
                    failures += not ok
                    emit({"check": name, **base, "rel_l2": err, "bound": bound, "finite": finite, "ok": ok,
                          "op_backends": op_backends(dev, "auto")})
                if CUDA:
                    emit({"check": "engine cache", **base, **g16_eng.cache_info()})
        except Exception as e:  # one solver's failure must not hide the others'
            failures += 1
            emit({"check": "error", **base, "error": f"{type(e).__name__}: {str(e)[:300]}", "ok": False})
    return 1 if failures else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deep", help="deep, default, or a UNet config name (tiny, fmnist_small)")
    p.add_argument("--solver", default="genie", choices=["all", *SOLVERS],
                   help="a solver of genie_fast.solvers.SOLVERS, or all of them (--check)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--nfe", type=int, default=10)
    p.add_argument("--dtype", default=None, help="network dtype: fp16 (CUDA default), bf16, fp32 (CPU default)")
    p.add_argument("--mode", default="both", choices=["eager", "graph", "both"])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--check", action="store_true", help="agreement checks instead of a profile run")
    p.add_argument("--json", default=None, help="--check: also append each record to this JSON Lines file")
    args = p.parse_args(argv)
    if args.batch < 1 or args.nfe < 1 or args.iters < 1:
        p.error("batch, nfe and iters must be positive")
    if args.solver == "all" and not args.check:
        p.error("--solver all is for --check; a profile run takes one solver")
    dev = torch.device("cuda" if CUDA else "cpu")
    models = load_models([args.model], print)
    if args.model not in models:
        print(f"profile_sample: model {args.model!r} not available")
        return 2
    model = models[args.model]
    if args.check:
        fh = open(args.json, "a") if args.json else None

        def emit(rec):
            line = json.dumps(rec, default=str)
            print(line, flush=True)
            if fh is not None:
                fh.write(line + "\n")
                fh.flush()
        try:
            return run_check(model, args, dev, emit)
        finally:
            if fh is not None:
                fh.close()
    run_profile(model, args, dev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
