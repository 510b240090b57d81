"""Which time grid (and AFS or not) is best per solver on the bundled model: ODE error at small NFE.

For every solver, grid (uniform, quadratic, logsnr, edm), AFS off/on and NFE budget, the RMSE of
x0 against a high-accuracy solution of the same network's ODE from the same noise (RK4 in
log gamma, `bench_quality.rk4_reference`, checked against itself at half the steps). This is
what chose `genie_fast.solvers.AUTO_GRID` / `AUTO_AFS` (the table is in docs/guide.md and
bench/RESULTS.md, "Sampling defaults").

    PYTHONPATH=. python bench/bench_grids.py --n 16 --nfes 5,10,20 --threads 1 --json bench/results/grids/grids.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_quality import rk4_reference  # noqa: E402

import genie_fast  # noqa: E402
from genie_fast.schedule import GRIDS  # noqa: E402
from genie_fast.solvers import SOLVERS  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16, help="samples (fixed noise, seed 0)")
    p.add_argument("--nfes", default="5,10,20")
    p.add_argument("--solvers", default=",".join(SOLVERS))
    p.add_argument("--grids", default=",".join(GRIDS))
    p.add_argument("--ref-steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write every row here (rewritten after each row)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from genie_fast.models import load_default

    model = load_default()
    noise = torch.randn(args.n, *model.image_shape, generator=torch.Generator().manual_seed(0))
    t0 = time.time()
    ref = rk4_reference(model, model.schedule, noise, args.ref_steps)
    ref_half = rk4_reference(model, model.schedule, noise, args.ref_steps // 2)
    out = {"env": {"torch": torch.__version__, "machine": platform.machine(), "threads": args.threads,
                   "date": time.strftime("%Y-%m-%d")},
           "reference": {"method": "RK4 in log gamma", "steps": args.ref_steps, "seconds": time.time() - t0,
                         "rms_diff_vs_half_steps": float((ref - ref_half).pow(2).mean().sqrt())},
           "rows": []}
    print("reference", out["reference"], flush=True)
    for solver in args.solvers.split(","):
        for grid in args.grids.split(","):
            for afs in (False, True):
                for nfe in map(int, args.nfes.split(",")):
                    t1 = time.time()
                    try:
                        x0, used = genie_fast.sample(model, noise=noise, solver=solver, nfe=nfe, grid=grid, afs=afs)
                        rmse = float((x0.float() - ref).pow(2).mean().sqrt())
                    except ValueError as e:  # a budget too small for one step of this solver
                        used, rmse = None, None
                        print(f"{solver} {grid} afs={afs} nfe={nfe}: {e}")
                    row = {"solver": solver, "grid": grid, "afs": afs, "nfe_budget": nfe, "nfe": used,
                           "rmse": rmse, "seconds": round(time.time() - t1, 2)}
                    out["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    if args.json:
                        with open(args.json, "w") as f:
                            json.dump(out, f, indent=1)
    # best (grid, afs) per solver and budget
    for solver in args.solvers.split(","):
        for nfe in map(int, args.nfes.split(",")):
            rows = [r for r in out["rows"] if r["solver"] == solver and r["nfe_budget"] == nfe and r["rmse"] is not None]
            if rows:
                best = min(rows, key=lambda r: r["rmse"])
                print(f"best {solver:>13} nfe {nfe:>3}: {best['grid']:>9} afs={best['afs']!s:>5} rmse {best['rmse']:.4f}")


if __name__ == "__main__":
    main()
