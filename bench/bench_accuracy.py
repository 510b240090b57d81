"""Solver accuracy vs NFE on exact-score problems (Gaussian mixtures), against float64 references.

    python bench/bench_accuracy.py                 # writes bench/results/accuracy/accuracy.{json,png}
    python bench/bench_accuracy.py --grid logsnr   # writes bench/results/accuracy/accuracy_logsnr.{json,png}

Problems: a single Gaussian (diagonal covariance, 3x8x8; closed-form ODE solution) and an
8-mode mixture (1x8x8; RK4 reference, `genie_fast.reference`). Every solver runs in float64 from
the same noise on the same kind of time grid with the most steps its NFE budget allows
(`solvers.steps_for_nfe`). Two error measures per run, both against the reference x(t_end):
RMSE over all samples and pixels, and the median over samples of each sample's RMS error
(a few samples that switch modes dominate the RMSE on a mixture).

Solver rows: every entry of SOLVERS, with `genie` given the exact d eps/d gamma as its head
("genie (exact head)": an ideally distilled head at 1 NFE per step, the paper's accounting with
the head's own cost left out) and also run with AFS; `genie_exact` pays 3 NFE per step.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import torch

from genie_fast.models import GaussianMixture
from genie_fast.reference import reference_solution
from genie_fast.schedule import time_grid
from genie_fast.solvers import SOLVERS, steps_for_nfe

NFES = (4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50)


def problems(batch: int, seed: int):
    gauss = GaussianMixture.random(1, (3, 8, 8), seed=seed, diagonal=True, std_range=(0.1, 0.5))
    mix = GaussianMixture.random(8, (1, 8, 8), seed=seed + 1, std_range=(0.1, 0.3))
    out = {}
    for name, model in (("gaussian", gauss), ("mixture", mix)):
        g = torch.Generator().manual_seed(seed + 2)
        x = torch.randn(batch, *model.image_shape, dtype=torch.float64, generator=g)
        t0 = time.perf_counter()
        if model.num_components == 1:
            ref, err, how = model.ode_solution(x, 1.0, model.schedule.t_end), 0.0, "closed form"
        else:
            r = reference_solution(model, x, tol=1e-8)
            ref, err, how = r.x, r.err, f"RK4, {r.steps} steps"
        out[name] = dict(model=model, x=x, ref=ref, ref_err=err, ref_how=how, ref_s=time.perf_counter() - t0)
    return out


def variants(model):
    """label -> (solver name, extra kwargs)."""
    head = {"head": lambda x, t, eps: model.exact_deps(x, t)}
    rows = {}
    for name in SOLVERS:
        if name == "genie":
            rows["genie (exact head)"] = ("genie", dict(head))
            rows["genie (exact head) + AFS"] = ("genie", dict(head, afs=True))
        else:
            rows[name] = (name, {})
    return rows


def run(args):
    torch.set_num_threads(args.threads)
    probs = problems(args.batch, args.seed)
    rows = []
    for pname, p in probs.items():
        model, x, ref = p["model"], p["x"], p["ref"]
        for label, (name, kw) in variants(model).items():
            kw = dict(kw)
            afs = kw.pop("afs", False)
            for budget in NFES:
                steps = steps_for_nfe(name, budget, afs)
                if steps < 1:
                    continue
                ts = time_grid(model.schedule, steps, args.grid)
                t0 = time.perf_counter()
                with torch.no_grad():
                    out, nfe = SOLVERS[name](model, x, ts, model.schedule, afs=afs, **kw)
                per_sample = (out - ref).pow(2).flatten(1).mean(1).sqrt()
                rows.append(dict(problem=pname, solver=label, nfe_budget=budget, nfe=nfe, steps=steps,
                                 rmse=float((out - ref).pow(2).mean().sqrt()),
                                 median=float(per_sample.median()),
                                 seconds=time.perf_counter() - t0))
    return probs, rows


def table(rows, problem, metric, nfes=NFES):
    labels = list(dict.fromkeys(r["solver"] for r in rows if r["problem"] == problem))
    cell = {(r["solver"], r["nfe_budget"]): r for r in rows if r["problem"] == problem}
    lines = [f"| {problem}: {metric} | " + " | ".join(str(n) for n in nfes) + " |",
             "|---|" + "---:|" * len(nfes)]
    for label in labels:
        vals = []
        for n in nfes:
            r = cell.get((label, n))
            vals.append("" if r is None else f"{r[metric]:.2e}" + ("" if r["nfe"] == n else f" ({r['nfe']})"))
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def plot(rows, path, grid):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(2, 2, figsize=(12, 9), sharex=True)
    for i, problem in enumerate(("gaussian", "mixture")):
        for j, metric in enumerate(("rmse", "median")):
            ax = axes[i, j]
            labels = list(dict.fromkeys(r["solver"] for r in rows if r["problem"] == problem))
            for k, label in enumerate(labels):
                pts = sorted((r["nfe"], r[metric]) for r in rows if r["problem"] == problem and r["solver"] == label)
                style = "-" if k < 10 else "--"
                ax.loglog([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, label=label)
            ax.set_title(f"{problem}: {'RMSE' if metric == 'rmse' else 'median per-sample RMS error'}")
            ax.set_xticks([3, 4, 5, 6, 8, 10, 15, 20, 30, 40, 50])
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("NFE spent")
            ax.set_ylabel("error vs reference x(t_end)")
            ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"Solver error vs NFE on exact-score Gaussian mixtures (float64, {grid} time grid)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "accuracy"))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid", default="quadratic")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    probs, rows = run(args)
    meta = dict(
        command="python " + " ".join([os.path.relpath(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
        date=datetime.date.today().isoformat(), machine=machine(), torch=torch.__version__,
        grid=args.grid, batch=args.batch, seed=args.seed, dtype="float64",
        problems={k: dict(shape=list(p["model"].image_shape), components=p["model"].num_components,
                          reference=p["ref_how"], reference_err=p["ref_err"]) for k, p in probs.items()},
        seconds=time.perf_counter() - t0)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "accuracy" if args.grid == "quadratic" else f"accuracy_{args.grid}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    plot(rows, stem + ".png", args.grid)
    print(f"# {meta['command']}  ({meta['date']}, {meta['machine']}, torch {meta['torch']}, {meta['seconds']:.0f} s)")
    for k, p in meta["problems"].items():
        print(f"# {k}: shape {p['shape']}, {p['components']} component(s), reference {p['reference']} "
              f"(est. error {p['reference_err']:.1e})")
    print("# cells: error at the NFE budget; (n) = NFE actually spent when the budget does not divide")
    for problem in probs:
        for metric in ("median", "rmse"):
            print()
            print(table(rows, problem, metric))
    return meta, rows


if __name__ == "__main__":
    main()
