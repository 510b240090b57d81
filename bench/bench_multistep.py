"""genie_multistep against the multistep peers on an exact-score mixture, each on its best grid.

    python bench/bench_multistep.py            # writes bench/results/multistep/multistep.{json,png}
    python bench/bench_multistep.py --quality bench/results/quality_multistep/quality.json
        # the same best-grid table from a bench_quality.py run on the bundled model (ODE RMSE, FD)

The 8-mode mixture of bench_accuracy.py (1x8x8, float64, RK4 reference); every solver with AFS
(the library default) on each grid of GRIDS at each NFE; the GENIE solvers get the exact head
(the mixture's eps_and_head: head_error 0). Per solver and NFE the table keeps the grid with the
lowest median per-sample error (issue 15's target: lowest of all at NFE 4-10, and an order at
least UniPC's above 10, read off as the slope of log error against log NFE from 10 to 20).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_accuracy import machine, problems  # noqa: E402

from genie_fast.schedule import time_grid  # noqa: E402
from genie_fast.solvers import SOLVERS, steps_for_nfe  # noqa: E402

GRIDS = ("logsnr", "quadratic", "edm", "uniform")
NFES = (4, 5, 6, 8, 10, 12, 15, 20)
ROWS = {  # label -> (solver, keywords)
    "genie_multistep": ("genie_multistep", {}),
    "genie_multistep order 4": ("genie_multistep", {"order": 4}),
    "genie (exact head)": ("genie", {}),
    "unipc": ("unipc", {}),
    "dpmpp_2m": ("dpmpp_2m", {}),
    "dpmpp_3m": ("dpmpp_3m", {}),
    "ipndm": ("ipndm", {}),
}


def quality_table(path: str):
    """Per solver and NFE, the grid with the lowest ODE RMSE in a bench_quality.py result, and its FD."""
    with open(path) as f:
        rows = [r for r in json.load(f)["rows"] if "error" not in r]
    solvers = list(dict.fromkeys(r["solver"] for r in rows))
    nfes = sorted({r["nfe_requested"] for r in rows})
    best = {}
    for r in rows:
        key = (r["solver"], r["nfe_requested"])
        if key not in best or r["ode_rmse"] < best[key]["ode_rmse"]:
            best[key] = r
    print("| ODE RMSE / FD, best grid | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
    print("|---|" + "---|" * len(nfes))
    for s in solvers:
        cells = []
        for n in nfes:
            r = best.get((s, n))
            low = min(best[(o, n)]["ode_rmse"] for o in solvers if (o, n) in best)
            cell = "" if r is None else f"{r['ode_rmse']:.4f} / {r['fd']:.1f} {r['grid']}"
            cells.append(f"**{cell}**" if r is not None and r["ode_rmse"] == low else cell)
        print(f"| {s} | " + " | ".join(cells) + " |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quality", default=None, help="print the best-grid table of this bench_quality.py result")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "multistep"))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.quality:
        return quality_table(args.quality)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    p = problems(args.batch, args.seed)["mixture"]
    model, x, ref = p["model"], p["x"], p["ref"]
    rows = []
    for label, (name, kw) in ROWS.items():
        for grid in GRIDS:
            for nfe in NFES:
                steps = steps_for_nfe(name, nfe, afs=True)
                with torch.no_grad():
                    out, used = SOLVERS[name](model, x, time_grid(model.schedule, steps, grid), model.schedule,
                                              afs=True, **kw)
                err = (out - ref).pow(2).flatten(1).mean(1).sqrt()
                rows.append(dict(solver=label, grid=grid, nfe=used, median=float(err.median()),
                                 rmse=float((out - ref).pow(2).mean().sqrt())))
    best = {}
    for r in rows:
        key = (r["solver"], r["nfe"])
        if key not in best or r["median"] < best[key]["median"]:
            best[key] = r
    meta = dict(command="python " + " ".join([os.path.relpath(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
                date=datetime.date.today().isoformat(), machine=machine(), torch=torch.__version__,
                batch=args.batch, reference=p["ref_how"], seconds=time.perf_counter() - t0)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "multistep")
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)

    print(f"# {meta['command']}  ({meta['date']}, {meta['machine']}, {meta['seconds']:.0f} s)")
    print("| median error, best grid | " + " | ".join(map(str, NFES)) + " | slope 10->20 |")
    print("|---|" + "---:|" * (len(NFES) + 1))
    for label in ROWS:
        cells = []
        for n in NFES:
            r = best[(label, n)]
            low = min(best[(other, n)]["median"] for other in ROWS)
            cell = f"{r['median']:.2e} {r['grid'][:4]}"
            cells.append(f"**{cell}**" if r["median"] == low else cell)
        slope = -math.log(best[(label, 20)]["median"] / best[(label, 10)]["median"]) / math.log(2)
        print(f"| {label} | " + " | ".join(cells) + f" | {slope:.2f} |")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 5))
    for label in ROWS:
        ax.loglog(NFES, [best[(label, n)]["median"] for n in NFES], marker="o", ms=3, label=label)
    ax.set_xlabel("NFE")
    ax.set_ylabel("median per-sample RMS error (best grid per NFE)")
    ax.set_title("8-mode mixture, exact score and head, AFS")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=110)


if __name__ == "__main__":
    main()
