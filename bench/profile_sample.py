"""The sampling run to put under Nsight Systems or Nsight Compute, and the engine's agreement check.

Profile (after warm-up and capture, the measured calls sit between cudaProfilerStart/Stop, each
call inside an NVTX range ``sample`` of the domain ``genie_fast``; eager calls hold ``step`` >
``network`` > ``head`` and ``update`` ranges, graph calls one ``replay`` range):

    # timeline, NVTX ranges and kernels (Nsight Systems)
    nsys profile -t cuda,nvtx --capture-range=cudaProfilerApi -o genie_sample \\
        python bench/profile_sample.py --model deep --batch 16 --nfe 10 --mode both
    nsys stats --report nvtx_sum,cuda_gpu_kern_sum genie_sample.nsys-rep

    # kernels of the sampling calls only (Nsight Compute; push/pop ranges need the trailing "/")
    ncu --nvtx --nvtx-include "genie_fast@sample/" --profile-from-start off --clock-control none \\
        --set basic -o genie_sample python bench/profile_sample.py --model deep --batch 16 --mode graph

Check (fp16 graph against fp32 eager with TF32 off, and graph against eager with the same
kernels; exits 1 when a bound is broken):

    python bench/profile_sample.py --check --model fmnist_small --batch 8

On the CPU the run is eager (graphs need CUDA) and the ranges are no-ops unless a tool is attached.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sample import image_shape, load_models  # noqa: E402

from genie_fast.engine import SamplingEngine, no_tf32  # noqa: E402

CUDA = torch.cuda.is_available()
# The bounds of tests/test_engine.py (measured on the CPU; see bench/RESULTS.md "Sampling engine").
FP16_REL_BOUND = 2e-3
BF16_REL_BOUND = 1.6e-2
GRAPH_VS_EAGER_FP32_BOUND = 1e-5


def _profiler(start: bool):
    if CUDA:
        (torch.cuda.cudart().cudaProfilerStart if start else torch.cuda.cudart().cudaProfilerStop)()


def rel(x, ref):
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def run_profile(model, args, dev):
    shape = image_shape(model)
    z = torch.randn((args.batch, *shape), generator=torch.Generator().manual_seed(0)).to(dev)
    modes = ["eager", "graph"] if args.mode == "both" else [args.mode]
    if not CUDA and "graph" in modes:
        print("profile_sample: no CUDA GPU, so no graph mode; running eagerly")
        modes = ["eager"]
    engines = {m: SamplingEngine(model, device=dev, dtype=args.dtype, use_graphs=(m == "graph")) for m in modes}
    for m, eng in engines.items():  # warm-up, weight copies and capture outside the profiled region
        for _ in range(2):
            eng.sample(z, solver=args.solver, nfe=args.nfe)
    if CUDA:
        torch.cuda.synchronize()
    _profiler(True)
    for m, eng in engines.items():
        for i in range(args.iters):
            t0 = time.perf_counter()
            eng.sample(z, solver=args.solver, nfe=args.nfe)
            if CUDA:
                torch.cuda.synchronize()
            print(f"{m} call {i}: {(time.perf_counter() - t0) * 1e3:.3f} ms (host clock, synchronized)")
    _profiler(False)
    for m, eng in engines.items():
        print(f"{m}: {eng.cache_info()}")


def run_check(model, args, dev) -> int:
    """Agreement of the graph engine with eager runs; prints one JSON line per check."""
    if not CUDA:
        print("profile_sample --check: no CUDA GPU, nothing to check here (the CPU engine is eager; "
              "tests/test_engine.py covers it)")
        return 0
    shape = image_shape(model)
    z = torch.randn((args.batch, *shape), generator=torch.Generator().manual_seed(5)).to(dev)
    failures = 0
    with no_tf32():
        kw = dict(solver=args.solver, nfe=args.nfe)
        ref, _ = SamplingEngine(model, device=dev, dtype="fp32", use_graphs=False).sample(z, **kw)
        g32, _ = SamplingEngine(model, device=dev, dtype="fp32").sample(z, **kw)
        e16, _ = SamplingEngine(model, device=dev, dtype="fp16", use_graphs=False).sample(z, **kw)
        g16_eng = SamplingEngine(model, device=dev, dtype="fp16")
        g16, _ = g16_eng.sample(z, **kw)
        gbf, _ = SamplingEngine(model, device=dev, dtype="bf16").sample(z, **kw)
        checks = [("graph fp32 vs eager fp32", rel(g32, ref), GRAPH_VS_EAGER_FP32_BOUND),
                  ("graph fp16 vs eager fp16", rel(g16, e16), 0.1 * FP16_REL_BOUND),
                  ("graph fp16 vs eager fp32", rel(g16, ref), FP16_REL_BOUND),
                  ("graph bf16 vs eager fp32", rel(gbf, ref), BF16_REL_BOUND)]
        finite = bool(torch.isfinite(g16).all())
        for name, err, bound in checks:
            ok = finite and err < bound
            failures += not ok
            print(json.dumps({"check": name, "model": args.model, "batch": args.batch, "nfe": args.nfe,
                              "solver": args.solver, "rel_l2": err, "bound": bound, "ok": ok}))
        print(json.dumps({"check": "engine cache", **g16_eng.cache_info()}))
    return 1 if failures else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deep", help="deep, default, or a UNet config name (tiny, fmnist_small)")
    p.add_argument("--solver", default="genie", choices=["genie", "ddim", "dpmpp_2m"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--nfe", type=int, default=10)
    p.add_argument("--dtype", default=None, help="network dtype: fp16 (CUDA default), bf16, fp32 (CPU default)")
    p.add_argument("--mode", default="both", choices=["eager", "graph", "both"])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--check", action="store_true", help="agreement checks instead of a profile run")
    args = p.parse_args(argv)
    if args.batch < 1 or args.nfe < 1 or args.iters < 1:
        p.error("batch, nfe and iters must be positive")
    dev = torch.device("cuda" if CUDA else "cpu")
    if args.check and not CUDA:
        return run_check(None, args, dev)
    models = load_models([args.model], print)
    if args.model not in models:
        print(f"profile_sample: model {args.model!r} not available")
        return 2
    model = models[args.model]
    if args.check:
        return run_check(model, args, dev)
    run_profile(model, args, dev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
