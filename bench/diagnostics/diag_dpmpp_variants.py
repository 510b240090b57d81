"""DPM-Solver++ variants and lower_order_final on the exact-score 8-mode mixture (issue 15).

Median over samples of each sample's RMS error against the float64 RK4 reference, for
DPM-Solver++(2M) and (3M) with and without lowering the order of the last steps
(lower_order_final=True: the DPM-Solver authors' rule, below 10 steps; "diffusers": below 15), and
for DPM-Solver++(3M) "consistent" (third order, the default) against "reference" (the authors'
released 3M, second order). The problem is bench/bench_accuracy.py's "mixture" (same seed, batch and
reference); float64, uniform-logSNR grid, AFS on (so NFE n takes n + 1 steps). UniPC with and
without lowering is printed too.

    python bench/diagnostics/diag_dpmpp_variants.py              # one thread, about a minute
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

NFES = (4, 5, 6, 8, 10, 15, 20)
ROWS = {  # label -> (solver, keywords)
    "dpmpp_2m": ("dpmpp_2m", {}),
    "dpmpp_2m, lower_order_final=True": ("dpmpp_2m", {"lower_order_final": True}),
    "dpmpp_2m, lower_order_final='diffusers'": ("dpmpp_2m", {"lower_order_final": "diffusers"}),
    "dpmpp_3m consistent": ("dpmpp_3m", {}),
    "dpmpp_3m consistent, lower_order_final=True": ("dpmpp_3m", {"lower_order_final": True}),
    "dpmpp_3m consistent, lower_order_final='diffusers'": ("dpmpp_3m", {"lower_order_final": "diffusers"}),
    "dpmpp_3m reference": ("dpmpp_3m", {"variant": "reference"}),
    "dpmpp_3m reference, lower_order_final=True": ("dpmpp_3m", {"variant": "reference", "lower_order_final": True}),
    "dpmpp_3m reference, lower_order_final='diffusers'": ("dpmpp_3m", {"variant": "reference",
                                                                       "lower_order_final": "diffusers"}),
    "unipc": ("unipc", {}),
    "unipc, lower_order_final=True": ("unipc", {"lower_order_final": True}),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default="logsnr")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from bench_accuracy import problems
    from genie_fast.schedule import time_grid
    from genie_fast.solvers import SOLVERS, steps_for_nfe

    t0 = time.perf_counter()
    prob = problems(args.batch, args.seed)["mixture"]
    model, x, ref = prob["model"], prob["x"], prob["ref"]
    print(f"reference: {prob['ref_how']}, error estimate {prob['ref_err']:.1e}, {prob['ref_s']:.0f} s")
    print(f"\n| mixture, {args.grid}, AFS: median | " + " | ".join(str(n) for n in NFES) + " |")
    print("|---|" + "---:|" * len(NFES))
    for label, (name, kw) in ROWS.items():
        cells = []
        for budget in NFES:
            steps = steps_for_nfe(name, budget, afs=True)
            ts = time_grid(model.schedule, steps, args.grid)
            with torch.no_grad():
                out, nfe = SOLVERS[name](model, x, ts, model.schedule, afs=True, **kw)
            assert nfe == budget, (label, budget, nfe)
            cells.append(f"{float((out - ref).pow(2).flatten(1).mean(1).sqrt().median()):.2e}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"\n{time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
