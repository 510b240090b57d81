"""Tuned grids (`genie_fast.tune_grid`) against every fixed grid, on held-out noise.

    PYTHONPATH=. python bench/bench_tuned_grids.py bench/results/grids_cond6/null.json \
        --runs genie_multistep:5,unipc:5 --n 64 --json bench/results/grids_cond6/tuned_null.json
    PYTHONPATH=. python bench/bench_tuned_grids.py --table bench/results/tuned_bundled/null.json ... --plot out.png
    PYTHONPATH=. python bench/bench_tuned_grids.py --mixture --runs unipc:4,ipndm:4 --json mixture.json

The reference JSON is one of `bench/bench_grids.py` (its noise seed, labels, guidance and RK4
reference): the grids are tuned on `--n` noises of `--tune-seed` (never the reference's seed), with
the reference's labels setting (cycle: labels 0, 1, ... in turn, the same guidance), then run on the
reference's noise; the row gives the tuned grid's median per-sample error next to the best fixed
grid's from the same JSON, the tuning time and the tuned times. Rows are appended as they finish
(a killed run resumes at the next (solver, NFE)). `--store FILE` also writes each tuned grid, with how it
was tuned and its held-out errors, into a model's grids file (`genie_fast.save_tuned_grid`): how the
bundled model's genie_fast/assets/fmnist_genie.grids.json is made (bench/RESULTS.md, "Tuned grids").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_grids import errors  # noqa: E402

import genie_fast  # noqa: E402
from genie_fast.models import load_default  # noqa: E402


def table(paths) -> str:
    """Markdown: per (setting, solver, NFE) the best fixed grid's and the tuned grid's held-out median
    error, from tuned-grid JSONs and the bench_grids.py references they name (read now: fixed rows
    added to a reference after the tuning count), and which of issue 28's targets each row meets."""
    lines = ["| setting | solver | NFE | best fixed grid | fixed | tuned | fixed / tuned | target |",
             "|---|---|---|---|---|---|---|---|"]
    for path in paths:
        with open(path) as f:
            run = json.load(f)
        with open(run["reference"]) as f:
            ref = json.load(f)
        s = run["setting"]
        setting = "null" if s["labels"] == "none" else f"guided s={s['guidance']:g}"
        for r in sorted(run["rows"], key=lambda r: (r["solver"], r["nfe_budget"])):
            fixed = [q for q in ref["rows"] if q["solver"] == r["solver"] and q["nfe_budget"] == r["nfe_budget"]
                     and q["afs"] == r["afs"] and q.get("median") is not None]
            if not fixed:
                lines.append(f"| {setting} | {r['solver']} | {r['nfe_budget']} | - | - | {r['median']:.4f} | - | - |")
                continue
            best = min(fixed, key=lambda q: q["median"])
            ratio = best["median"] / r["median"]
            need = 1 / 0.75 if r["nfe_budget"] <= 6 else 1.0  # 25% below at NFE <= 6, no worse above
            lines.append(f"| {setting} | {r['solver']} | {r['nfe_budget']} | {best['grid']} | {best['median']:.4f} | "
                         f"{r['median']:.4f} | {ratio:.2f}x | {'met' if ratio >= need else 'missed'} |")
    return "\n".join(lines)


def plot(paths, out):
    """Median held-out error against NFE: each solver's best fixed grid (dashed) and its tuned grid (solid),
    one panel per setting (null class, guided)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(paths), figsize=(5.5 * len(paths), 4), squeeze=False)
    for ax, path in zip(axes[0], paths):
        with open(path) as f:
            run = json.load(f)
        with open(run["reference"]) as f:
            ref = json.load(f)
        s = run["setting"]
        for k, solver in enumerate(sorted({r["solver"] for r in run["rows"]})):
            rows = sorted((r for r in run["rows"] if r["solver"] == solver), key=lambda r: r["nfe"])
            fixed = {}
            for q in ref["rows"]:
                if q["solver"] == solver and q["afs"] and q.get("median") is not None:
                    fixed[q["nfe"]] = min(fixed.get(q["nfe"], float("inf")), q["median"])
            color = f"C{k}"
            ax.plot([r["nfe"] for r in rows], [r["median"] for r in rows], "o-", color=color, label=f"{solver} tuned")
            nfes = sorted(n for n in fixed if rows[0]["nfe"] <= n <= rows[-1]["nfe"])
            ax.plot(nfes, [fixed[n] for n in nfes], "s--", color=color, alpha=0.6, label=f"{solver} best fixed")
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel("median per-sample error vs RK4 (held-out noise)")
        ax.set_title("null class" if s["labels"] == "none" else f"guided, s = {s['guidance']:g}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def mixture_runs(spec: str, n_tune: int, max_evals: int, out_path):
    """The same comparison on an exact-score Gaussian mixture (8 components, 1x8x8, float64; its head is
    the exact d eps / d gamma): tuned on n_tune noises of seed 0, judged on 256 of seed 2026 against RK4
    (400 steps); the best fixed grid is the best of the four at the same budget. Rows as JSON lines."""
    from genie_fast.models.gmm import GaussianMixture
    from genie_fast.reference import rk4_solve
    from genie_fast.schedule import GRIDS, time_grid
    from genie_fast.solvers import resolve

    torch.set_default_dtype(torch.float64)
    model = GaussianMixture.random(8, (1, 8, 8), seed=0, spread=2.0)
    noise = torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(2026), dtype=torch.float64)
    ref = rk4_solve(model, noise, model.schedule, 1.0, model.schedule.t_end, 400)

    def median(solver, grid, afs):
        x, used = genie_fast.sample(model, noise=noise, solver=solver, grid=grid, afs=afs, dtype=torch.float64)
        return float((x - ref).pow(2).flatten(1).mean(1).sqrt().median()), used

    rows = []
    for item in spec.split(","):
        solver, nfe = item.split(":")[0], int(item.split(":")[1])
        steps = resolve(solver, nfe).steps
        fixed = {g: median(solver, time_grid(model.schedule, steps, g), True)[0] for g in GRIDS}
        t0 = time.time()
        ts = genie_fast.tune_grid(model, solver=solver, nfe=nfe, n=n_tune, seed=0, max_evals=max_evals, progress=False)
        tuned, used = median(solver, ts, ts.afs)
        best = min(fixed, key=fixed.get)
        row = {"model": "mixture", "solver": solver, "nfe": used, "tuned": tuned, "best_fixed_grid": best,
               "best_fixed": fixed[best], "ratio": fixed[best] / tuned, "tune_seconds": round(time.time() - t0, 1),
               "fixed": fixed, "times": [float(t) for t in ts]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if out_path:
            with open(out_path, "w") as f:
                json.dump(rows, f, indent=1)
    print("| solver | NFE | best fixed grid | fixed | tuned | fixed / tuned |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['solver']} | {r['nfe']} | {r['best_fixed_grid']} | {r['best_fixed']:.2e} | {r['tuned']:.2e} | "
              f"{r['ratio']:.2f}x |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reference", nargs="?", help="a bench_grids.py JSON (held-out noise, RK4 reference, fixed-grid rows)")
    p.add_argument("--table", nargs="+", default=None, metavar="JSON", help="print the table of these runs and stop")
    p.add_argument("--plot", default=None, metavar="PNG", help="with --table: also plot them here")
    p.add_argument("--mixture", action="store_true", help="the comparison on an exact-score mixture (--runs, --n, "
                   "--max-evals, --json), no reference needed")
    p.add_argument("--runs", default="genie_multistep:5", help="solver:NFE,...")
    p.add_argument("--n", type=int, default=64, help="tuning noises")
    p.add_argument("--tune-seed", type=int, default=0)
    p.add_argument("--method", default="search")
    p.add_argument("--max-evals", type=int, default=60)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--store", default=None, help="also store each grid in this grids file (STEM.grids.json)")
    args = p.parse_args(argv)
    if args.table:
        print(table(args.table))
        if args.plot:
            plot(args.table, args.plot)
        return
    torch.set_num_threads(args.threads)
    if args.mixture:
        mixture_runs(args.runs, args.n, args.max_evals, args.json)
        return
    if args.reference is None:
        p.error("give the reference JSON (or --table, --mixture)")
    with open(args.reference) as f:
        ref_run = json.load(f)
    s = ref_run["setting"]
    if s["seed"] == args.tune_seed:
        raise SystemExit("--tune-seed must differ from the reference's noise seed (held-out noise)")
    model = load_default()
    noise = torch.randn(s["n"], *model.image_shape, generator=torch.Generator().manual_seed(s["seed"]))
    cycle = s["labels"] != "none"
    labels = torch.arange(s["n"]) % model.num_classes if cycle else None
    tune_labels = torch.arange(args.n) % model.num_classes if cycle else None
    ref = torch.tensor(ref_run["ref_x0"])
    out = {"reference": args.reference, "setting": s, "n_tune": args.n, "tune_seed": args.tune_seed,
           "method": args.method, "max_evals": args.max_evals, "rows": []}
    if args.json and os.path.exists(args.json):
        with open(args.json) as f:
            old = json.load(f)
        if all(old.get(k) == out[k] for k in ("reference", "n_tune", "tune_seed", "method", "max_evals")):
            out = old
    done = {(r["solver"], r["nfe_budget"]) for r in out["rows"]}
    for spec in args.runs.split(","):
        solver, nfe = spec.split(":")[0], int(spec.split(":")[1])
        if (solver, nfe) in done:
            continue
        t0 = time.time()
        ts = genie_fast.tune_grid(model, solver=solver, nfe=nfe, n=args.n, seed=args.tune_seed, labels=tune_labels,
                                  guidance_scale=s["guidance"], method=args.method, max_evals=args.max_evals)
        seconds = time.time() - t0
        x0, used = genie_fast.sample(model, noise=noise, solver=solver, nfe=nfe, grid=ts, labels=labels,
                                     guidance_scale=s["guidance"])
        rmse, median = errors(x0, ref)
        fixed = [r for r in ref_run["rows"] if r["solver"] == solver and r["nfe_budget"] == nfe
                 and r["afs"] == ts.afs and r.get("median") is not None]
        best = min(fixed, key=lambda r: r["median"]) if fixed else None
        row = {"solver": solver, "nfe_budget": nfe, "nfe": used, "afs": ts.afs, "median": median, "rmse": rmse,
               "best_fixed_grid": best and best["grid"], "best_fixed_median": best and best["median"],
               "ratio": best and best["median"] / median, "tune_seconds": round(seconds, 1),
               "times": [float(t) for t in ts]}
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
        if args.store:
            held = {k: row[k] for k in ("median", "best_fixed_grid", "best_fixed_median")}
            held.update(noise_seed=s["seed"], n=s["n"], reference=f"rk4 {s['ref_steps']} steps")
            genie_fast.save_tuned_grid(model, ts, solver, guidance_scale=s["guidance"] if cycle else None,
                                       path=args.store, info={**ts.info, "held_out": held})
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
