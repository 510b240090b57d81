"""Which time grid (and AFS or not) is best per solver on the bundled model: ODE error at small NFE.

For every solver, grid (uniform, quadratic, logsnr, edm), AFS off/on and NFE budget, the error of
x0 against a high-accuracy solution of the same network's ODE from the same noise (RK4 in
log gamma, `bench_quality.rk4_reference`, checked against itself at half the steps): the RMSE over
all samples and the median over samples of each sample's RMSE. This is what chose
`genie_fast.solvers.AUTO_GRID` / `AUTO_AFS` (the table is in docs/guide.md and bench/RESULTS.md,
"Sampling defaults").

--labels: none (a conditional model's null class, unguided) or cycle (labels 0, 1, ... in turn,
guided with --guidance; the reference solves the same guided ODE). --seed picks the noise: the
head and the grids were never fitted to any noise, but keep a seed of its own for held-out figures.
The JSON is rewritten after each row and rows already in it (same model, noise and reference) are
reused, so a killed run resumes.

    PYTHONPATH=. python bench/bench_grids.py --n 16 --nfes 5,10,20 --threads 1 --json bench/results/grids/grids.json
    PYTHONPATH=. python bench/bench_grids.py --n 32 --nfes 5,10,15 --afs on --seed 2026 --labels cycle \
        --guidance 2 --json bench/results/grids_cond6/guided.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_quality import rk4_reference  # noqa: E402

import genie_fast  # noqa: E402
from genie_fast.guidance import conditioned  # noqa: E402
from genie_fast.schedule import GRIDS  # noqa: E402
from genie_fast.solvers import SOLVERS  # noqa: E402


def errors(x0: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(RMSE over every sample, median over samples of each sample's RMSE)."""
    per = (x0.float() - ref).pow(2).flatten(1).mean(1)
    return float(per.mean().sqrt()), float(per.sqrt().median())


def table(path: str) -> str:
    """Markdown: one row per solver, one column per grid, cells "NFE a / b / c" of the median
    per-sample error; the best grid per NFE in bold, and each solver's best against genie_multistep."""
    with open(path) as f:
        rows = json.load(f)["rows"]
    solvers = list(dict.fromkeys(r["solver"] for r in rows))
    grids = list(dict.fromkeys(r["grid"] for r in rows))
    nfes = sorted({r["nfe_budget"] for r in rows})
    cell = {(r["solver"], r["grid"], r["nfe_budget"]): r["median"] for r in rows if r["afs"]}
    best = {(s, n): min((cell.get((s, g, n)) or float("inf"), g) for g in grids) for s in solvers for n in nfes}
    out = [f"{path}: median per-sample RMS error at NFE {' / '.join(map(str, nfes))} (AFS on; bold: best grid)", "",
           "| solver | " + " | ".join(grids) + " | best |", "|---" * (len(grids) + 2) + "|"]
    for s in solvers:
        cells = []
        for g in grids:
            vals = []
            for n in nfes:
                v = cell.get((s, g, n))
                txt = "-" if v is None else f"{v:.4f}"
                vals.append(f"**{txt}**" if v is not None and best[(s, n)][1] == g else txt)
            cells.append(" / ".join(vals))
        out.append(f"| {s} | " + " | ".join(cells) + " | " + " / ".join(f"{best[(s, n)][0]:.4f}" for n in nfes) + " |")
    return "\n".join(out)


def choose(paths) -> dict:
    """solver -> (grid, geometric mean of its median errors, cells): over every (file, NFE) that has
    a row for each grid of that solver (AFS on)."""
    cells = {}
    for path in paths:
        with open(path) as f:
            for r in json.load(f)["rows"]:
                if r["afs"] and r.get("median"):
                    cells.setdefault(r["solver"], {}).setdefault((path, r["nfe_budget"]), {})[r["grid"]] = r["median"]
    out = {}
    for solver, by_cell in cells.items():
        grids = set.intersection(*(set(v) for v in by_cell.values()))
        full = [v for v in by_cell.values() if grids <= set(v)]
        score = {g: math.exp(sum(math.log(v[g]) for v in full) / len(full)) for g in grids}
        best = min(score, key=score.get)
        out[solver] = (best, score[best], len(full))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16, help="samples (fixed noise of --seed)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--nfes", default="5,10,20")
    p.add_argument("--solvers", default=",".join(s for s in SOLVERS if s != "genie_exact"))
    p.add_argument("--grids", default=",".join(GRIDS))
    p.add_argument("--afs", choices=["both", "on", "off"], default="both")
    p.add_argument("--labels", choices=["none", "cycle"], default="none")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale with --labels cycle")
    p.add_argument("--ref-steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write every row here (rewritten after each row; resumes)")
    p.add_argument("--table", nargs="+", default=None, metavar="JSON",
                   help="print the markdown table of these result files (median per-sample error) and exit")
    p.add_argument("--choose", nargs="+", default=None, metavar="JSON",
                   help="print, per solver, the grid with the lowest geometric mean of the median error over "
                        "every NFE of these result files (AFS on; the rule behind solvers.AUTO_GRID) and exit")
    args = p.parse_args(argv)
    if args.table:
        for path in args.table:
            print(table(path))
        return
    if args.choose:
        for solver, (grid, score, cells) in choose(args.choose).items():
            print(f"{solver:>15}: {grid:>9}  (geometric mean {score:.4f} over {cells} cells)")
        return
    torch.set_num_threads(args.threads)

    from genie_fast.models import load_default

    model = load_default()
    noise = torch.randn(args.n, *model.image_shape, generator=torch.Generator().manual_seed(args.seed))
    labels = None if args.labels == "none" else torch.arange(args.n) % model.num_classes
    eps_fn = conditioned(model, labels, args.guidance if labels is not None else None, batch=args.n)
    setting = {"n": args.n, "seed": args.seed, "labels": args.labels, "guidance": args.guidance,
               "ref_steps": args.ref_steps, "model": dict(getattr(model, "provenance", {}) or {}),
               "head_error": getattr(model, "head_error", None)}
    out = None
    if args.json and os.path.exists(args.json):
        with open(args.json) as f:
            old = json.load(f)
        if old.get("setting") == json.loads(json.dumps(setting)):
            out = old
            print(f"resuming {args.json}: {len(out['rows'])} rows", flush=True)
        else:
            print(f"{args.json}: another model or setting; starting afresh", flush=True)
    if out is None:
        t0 = time.time()
        ref = rk4_reference(eps_fn, model.schedule, noise, args.ref_steps)
        ref_half = rk4_reference(eps_fn, model.schedule, noise, args.ref_steps // 2)
        out = {"env": {"torch": torch.__version__, "machine": platform.machine(), "threads": args.threads,
                       "date": time.strftime("%Y-%m-%d")}, "setting": setting,
               "reference": {"method": "RK4 in log gamma", "steps": args.ref_steps, "seconds": time.time() - t0,
                             "rms_diff_vs_half_steps": float((ref - ref_half).pow(2).mean().sqrt())},
               "ref_x0": ref.tolist(), "rows": []}
        print("reference", out["reference"], flush=True)
    ref = torch.tensor(out["ref_x0"])
    done = {(r["solver"], r["grid"], r["afs"], r["nfe_budget"]) for r in out["rows"]}
    afs_opts = {"both": (False, True), "on": (True,), "off": (False,)}[args.afs]
    for solver in args.solvers.split(","):
        for grid in args.grids.split(","):
            for afs in afs_opts:
                for nfe in map(int, args.nfes.split(",")):
                    if (solver, grid, afs, nfe) in done:
                        continue
                    t1 = time.time()
                    try:
                        x0, used = genie_fast.sample(model, noise=noise, solver=solver, nfe=nfe, grid=grid, afs=afs,
                                                     labels=labels, guidance_scale=args.guidance)
                        rmse, median = errors(x0, ref)
                    except ValueError as e:  # a budget too small for one step of this solver
                        used, rmse, median = None, None, None
                        print(f"{solver} {grid} afs={afs} nfe={nfe}: {e}")
                    row = {"solver": solver, "grid": grid, "afs": afs, "nfe_budget": nfe, "nfe": used,
                           "rmse": rmse, "median": median, "seconds": round(time.time() - t1, 2)}
                    out["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    if args.json:
                        tmp = args.json + ".tmp"
                        with open(tmp, "w") as f:
                            json.dump(out, f)
                        os.replace(tmp, args.json)
    # best (grid, afs) per solver and budget, by the median per-sample error
    for solver in args.solvers.split(","):
        for nfe in map(int, args.nfes.split(",")):
            rows = [r for r in out["rows"] if r["solver"] == solver and r["nfe_budget"] == nfe
                    and r.get("median") is not None]
            if rows:
                best = min(rows, key=lambda r: r["median"])
                print(f"best {solver:>15} nfe {nfe:>3}: {best['grid']:>9} afs={best['afs']!s:>5} "
                      f"median {best['median']:.4f} rmse {best['rmse']:.4f}")


if __name__ == "__main__":
    main()
