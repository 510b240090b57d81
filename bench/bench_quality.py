"""Sample quality of the bundled Fashion-MNIST model across solvers and NFEs.

No Inception network exists offline, so the feature space is a small CNN classifier trained here
on Fashion-MNIST (cached in bench/results/quality/classifier.safetensors). Numbers are a Frechet distance
("FD") and KID in *that* feature space against the test set: not FID, not comparable to FID.

Also measured: ODE-solution error of each solver against a high-accuracy reference of the same
network (RK4 in log-gamma, checked against itself at half the steps), and the GENIE head's
relative L2 error against the exact JVP on held-out (x_t, t).

    PYTHONPATH=. python bench/bench_quality.py --n 500 --threads 1          # full table
    PYTHONPATH=. python bench/bench_quality.py --only head                  # head fidelity only

Writes bench/results/quality/{quality.json, table.md, error_vs_nfe.png, fd_vs_nfe.png, grid_<solver>.png}.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
CLF_DIR = ROOT / "results" / "quality"  # the cached classifier
OUT = CLF_DIR  # results; --out changes it

# Solver -> time grids; first is the solver authors' recommendation for unconditional sampling.
SOLVER_GRIDS = {
    "ddim": ["quadratic"],
    "genie": ["quadratic", "logsnr"],
    "genie_exact": ["quadratic"],
    "genie+afs": ["quadratic", "logsnr"],  # the paper's setting: analytical first step
    "genie_exact+afs": ["quadratic"],
    "dpm_solver_2": ["logsnr"],
    "dpmpp_2m": ["logsnr"],
    "dpmpp_3m": ["logsnr"],
    "unipc": ["logsnr"],
    "ipndm": ["edm"],
    # the multistep comparison (issue 15): every solver with AFS (the defaults) on each candidate grid
    "genie_multistep+afs": ["logsnr", "quadratic", "edm"],
    "unipc+afs": ["logsnr", "quadratic", "edm"],
    "dpmpp_2m+afs": ["logsnr", "quadratic", "edm"],
    "dpmpp_3m+afs": ["logsnr", "quadratic", "edm"],
    "ipndm+afs": ["logsnr", "quadratic", "edm", "uniform"],
}
NFES = (5, 10, 15, 20, 25)


# --------------------------------------------------------------------------- classifier

class Classifier(nn.Module):
    """Small CNN on (B, 1, 32, 32) in [-1, 1]; features() is the 128-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 64, 3, padding=1)
        self.c3 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc = nn.Linear(128 * 4 * 4, 128)
        self.out = nn.Linear(128, 10)

    def features(self, x):
        h = F.max_pool2d(F.relu(self.c1(x)), 2)
        h = F.max_pool2d(F.relu(self.c2(h)), 2)
        h = F.max_pool2d(F.relu(self.c3(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x):
        return self.out(self.features(x))


def get_classifier(epochs: int = 3, log=print) -> tuple[Classifier, float]:
    from safetensors.torch import load_file, save_file
    from genie_fast.data import load_fashion_mnist

    path = CLF_DIR / "classifier.safetensors"
    meta_path = CLF_DIR / "classifier.json"
    clf = Classifier()
    x_test, y_test = load_fashion_mnist("test")
    if path.exists():
        clf.load_state_dict(load_file(str(path)))
        acc = json.loads(meta_path.read_text())["test_accuracy"]
        return clf.eval(), acc
    x_train, y_train = load_fashion_mnist("train")
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(clf.parameters(), 1e-3)
    n, bs = len(x_train), 128
    t0 = time.time()
    for ep in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - bs + 1, bs):
            idx = perm[i:i + bs]
            x = x_train[idx]
            x = torch.where(torch.rand(bs, 1, 1, 1, generator=g) < 0.5, x.flip(-1), x)
            loss = F.cross_entropy(clf(x), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        log(f"classifier epoch {ep + 1}/{epochs} loss {loss.item():.3f} ({time.time() - t0:.0f} s)")
    clf.eval()
    with torch.no_grad():
        acc = float(torch.cat([clf(x_test[i:i + 1000]).argmax(1) for i in range(0, len(x_test), 1000)])
                    .eq(y_test).float().mean())
    CLF_DIR.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(path))
    meta_path.write_text(json.dumps({"test_accuracy": acc, "epochs": epochs, "train_s": time.time() - t0}, indent=2))
    return clf, acc


@torch.no_grad()
def features(clf, x, bs=500):
    return torch.cat([clf.features(x[i:i + bs].clamp(-1, 1)) for i in range(0, len(x), bs)]).double()


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    mu1, mu2 = f1.mean(0), f2.mean(0)
    c1, c2 = torch.cov(f1.T), torch.cov(f2.T)
    # tr sqrt(c1 c2) via the symmetric form sqrt(c1)^{1/2} c2 sqrt(c1)^{1/2}
    w, v = torch.linalg.eigh(c1)
    s1 = (v * w.clamp_min(0).sqrt()) @ v.T
    m = s1 @ c2 @ s1
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + c1.trace() + c2.trace() - 2 * tr_sqrt)


def kid(f1: torch.Tensor, f2: torch.Tensor, subsets: int = 20, size: int = 200, seed: int = 0) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel, averaged over random subsets."""
    g = torch.Generator().manual_seed(seed)
    d = f1.shape[1]
    size = min(size, len(f1), len(f2))
    vals = []
    for _ in range(subsets):
        a = f1[torch.randperm(len(f1), generator=g)[:size]]
        b = f2[torch.randperm(len(f2), generator=g)[:size]]
        kaa, kbb, kab = ((a @ a.T) / d + 1) ** 3, ((b @ b.T) / d + 1) ** 3, ((a @ b.T) / d + 1) ** 3
        m = size
        vals.append((kaa.sum() - kaa.trace()) / (m * (m - 1)) + (kbb.sum() - kbb.trace()) / (m * (m - 1))
                    - 2 * kab.mean())
    return float(torch.stack(vals).mean())


# --------------------------------------------------------------------------- reference ODE solution

@torch.no_grad()
def rk4_reference(eps_fn, schedule, noise, steps: int, bs: int = 256) -> torch.Tensor:
    """x_0 at t_end of the DDIM ODE by RK4 in lambda = log gamma: d x_bar / d lambda = gamma eps."""
    lam0 = math.log(schedule.gamma(1.0))
    lam1 = math.log(schedule.gamma(schedule.t_end))
    h = (lam1 - lam0) / steps
    out = []
    for i in range(0, len(noise), bs):
        z = noise[i:i + bs].double()

        def f(xb, lam):
            g = math.exp(lam)
            t = torch.full((len(xb),), schedule.t_of_gamma(g), dtype=torch.float32)
            x = (xb / math.sqrt(1 + g * g)).float()
            return g * eps_fn(x, t).double()

        xb = z * math.sqrt(1 + schedule.gamma(1.0) ** 2)  # x_T = noise at t = 1
        lam = lam0
        for _ in range(steps):
            k1 = f(xb, lam)
            k2 = f(xb + h / 2 * k1, lam + h / 2)
            k3 = f(xb + h / 2 * k2, lam + h / 2)
            k4 = f(xb + h * k3, lam + h)
            xb, lam = xb + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), lam + h
        out.append((xb / math.sqrt(1 + math.exp(lam1) ** 2)).float())
    return torch.cat(out)


# --------------------------------------------------------------------------- head fidelity

def head_fidelity(model, n: int = 256, bins: int = 8, seed: int = 0) -> dict:
    """Error of the head's d eps/d gamma vs the exact JVP on test images, per t-bin and pooled.

    Per sample: relative L2 error. Pooled: sqrt(sum gamma^2 |head - exact|^2 / sum gamma^2 |exact|^2)
    over all samples and bins, the error in the distillation loss's own weighting. That is the one
    that matters to sampling: on a logSNR grid h ~ gamma, so the Taylor term's error relative to
    x_bar goes as gamma |head - exact|, while the mean of per-sample ratios is dominated by t near
    1, where the target is tiny (gamma |exact| ~ 0.01 against ~0.15 at small t) and barely matters.
    """
    from genie_fast.data import load_fashion_mnist
    from genie_fast.distill import jvp_deps
    from genie_fast.schedule import q_sample

    x_test, _ = load_fashion_mnist("test")
    g = torch.Generator().manual_seed(seed)
    x0 = x_test[torch.randperm(len(x_test), generator=g)[:n]]
    s = model.schedule
    edges = np.linspace(s.t_end, 1.0, bins + 1)
    rows, num_w, den_w = [], 0.0, 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        t = lo + (hi - lo) * torch.rand(n, generator=g)
        x_t, _, _ = q_sample(x0, s, g, t)
        errs, bin_num, bin_den = [], 0.0, 0.0
        for i in range(0, n, 64):
            xb, tb = x_t[i:i + 64], t[i:i + 64]
            with torch.no_grad():
                _, deps_head = model.eps_and_deps(xb, tb)
            _, deps_true = jvp_deps(model.unet, xb, tb, s)
            num = (deps_head - deps_true).flatten(1).norm(dim=1)
            den = deps_true.flatten(1).norm(dim=1)
            errs.append(num / den)
            gam = s.gamma(tb)
            bin_num += float((gam * num).square().sum())
            bin_den += float((gam * den).square().sum())
        e = torch.cat(errs)
        num_w, den_w = num_w + bin_num, den_w + bin_den
        rows.append({"t_lo": float(lo), "t_hi": float(hi), "rel_err_mean": float(e.mean()),
                     "rel_err_median": float(e.median()), "rel_err_pooled": math.sqrt(bin_num / bin_den),
                     "gamma_rms_exact": math.sqrt(bin_den / (n * x0[0].numel()))})
    overall = float(np.mean([r["rel_err_mean"] for r in rows]))
    return {"per_t_bin": rows, "rel_err_mean": overall, "rel_err_pooled_gamma_weighted": math.sqrt(num_w / den_w),
            "n": n}


# --------------------------------------------------------------------------- main

def main(argv=None):
    global OUT
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=500, help="samples per (solver, NFE) for FD/KID")
    p.add_argument("--n-ode", type=int, default=64, help="samples for the ODE-error reference")
    p.add_argument("--ref-steps", type=int, default=100, help="RK4 steps of the reference (checked at half)")
    p.add_argument("--nfes", default=",".join(map(str, NFES)))
    p.add_argument("--solvers", default=",".join(SOLVER_GRIDS),
                   help="comma-separated name[+afs][@grid] (without @grid: the grids of SOLVER_GRIDS)")
    p.add_argument("--only", choices=["head", "samples"], default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="model stem written by `genie-fast export` (default: bundled)")
    p.add_argument("--unet-ckpt", default=None, help="a training checkpoint's EMA network instead (head from "
                   "--model); several, comma-separated: their average")
    p.add_argument("--out", default=None, help=f"results directory (default {OUT})")
    p.add_argument("--net-dtype", default=None,
                   help="the network's dtype for the solvers' samples (e.g. bf16, run where the CPU has native bf16: "
                        "float32 elsewhere, see genie_fast.devices.cpu_net_dtype); the RK4 reference stays float32")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.out:
        OUT = Path(args.out)
    OUT.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT.parent))

    import genie_fast
    from genie_fast.cli import save_grid
    from genie_fast.data import load_fashion_mnist
    from genie_fast.distill import with_trained_unet

    model = with_trained_unet(args.model, args.unet_ckpt)  # --unet-ckpt: a network still in training
    result = {"device": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": args.threads, "model_provenance": getattr(model, "provenance", {}),
              "n": args.n, "n_ode": args.n_ode, "ref_steps": args.ref_steps, "seed": args.seed,
              "net_dtype": args.net_dtype}
    if args.net_dtype is not None:  # what the CPU runs (bf16 only where native)
        from genie_fast.devices import DTYPES, cpu_net_dtype
        result["net_dtype_run"] = str(cpu_net_dtype(DTYPES[args.net_dtype])).replace("torch.", "")
    res_path = OUT / "quality.json"
    if res_path.exists():
        old = json.loads(res_path.read_text())
        # Rows are reused (a killed run resumes) only when they measured the same thing.
        if all(old.get(k) == result[k] for k in ("model_provenance", "n", "n_ode", "ref_steps", "seed", "net_dtype")):
            result = {**old, **result}
        else:
            print(f"{res_path}: earlier results are for another model or setting; starting afresh")

    def save():
        res_path.write_text(json.dumps(result, indent=2))

    if args.only in (None, "head"):
        t0 = time.time()
        result["head_fidelity"] = head_fidelity(model)
        result["head_fidelity"]["seconds"] = time.time() - t0
        print("head relative error vs exact JVP:", json.dumps(result["head_fidelity"], indent=1))
        save()
    if args.only == "head":
        return

    clf, acc = get_classifier()
    result["classifier_test_accuracy"] = acc
    print(f"classifier test accuracy {acc:.4f}")
    x_test, _ = load_fashion_mnist("test")
    f_test = features(clf, x_test)
    f_train_ref = features(clf, load_fashion_mnist("train")[0][: args.n])
    result["fd_train_vs_test"] = frechet_distance(f_train_ref, f_test)  # floor at this sample size
    result["kid_train_vs_test"] = kid(f_train_ref, f_test)

    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.n, 1, 32, 32, generator=g)
    ref_noise = noise[: args.n_ode]
    t0 = time.time()
    ref = rk4_reference(model, model.schedule, ref_noise, args.ref_steps)
    ref_half = rk4_reference(model, model.schedule, ref_noise, args.ref_steps // 2)
    result["reference"] = {"method": "RK4 in log-gamma", "steps": args.ref_steps,
                           "nfe": 4 * args.ref_steps, "seconds": time.time() - t0,
                           "rms_diff_vs_half_steps": float((ref - ref_half).pow(2).mean().sqrt())}
    print("reference", result["reference"])
    save()

    rows = result.setdefault("rows", [])
    done = {(r["solver"], r["grid"], r["nfe_requested"]) for r in rows}
    for spec in args.solvers.split(","):
        solver, _, one_grid = spec.partition("@")  # "name[+afs]@grid": that grid only
        for grid in [one_grid] if one_grid else SOLVER_GRIDS.get(solver, ["quadratic"]):
            for nfe in map(int, args.nfes.split(",")):
                if (solver, grid, nfe) in done:
                    continue
                t0 = time.time()
                name, _, flag = solver.partition("+")
                try:
                    x0, used = genie_fast.sample(model=model, noise=noise, solver=name, nfe=nfe, grid=grid,
                                                 afs=flag == "afs", net_dtype=args.net_dtype)
                except Exception as e:  # a solver missing or refusing this NFE is recorded, not fatal
                    print(f"{solver}/{grid}/nfe={nfe}: skipped ({type(e).__name__}: {e})")
                    rows.append({"solver": solver, "grid": grid, "nfe_requested": nfe, "error": str(e)})
                    save()
                    continue
                sec = time.time() - t0
                f_gen = features(clf, x0)
                row = {"solver": solver, "grid": grid, "nfe_requested": nfe, "nfe": int(used),
                       "fd": frechet_distance(f_gen, f_test), "kid": kid(f_gen, f_test),
                       "ode_rmse": float((x0[: args.n_ode] - ref).pow(2).mean().sqrt()),
                       # the RMSE is dominated by the few trajectories that switch mode; the median
                       # of the per-sample errors is the typical one
                       "ode_median": float((x0[: args.n_ode] - ref).pow(2).flatten(1).mean(1).sqrt().median()),
                       "seconds": sec}
                rows.append(row)
                print(row, flush=True)
                if nfe == 10 and grid == SOLVER_GRIDS.get(solver, [grid])[0]:
                    save_grid(x0[:64], OUT / f"grid_{solver}.png")
                save()
    write_table_and_plots(result)


def write_table_and_plots(result):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.get("rows", []) if "error" not in r]
    lines = ["| solver | grid | NFE | FD (classifier feats) | KID | ODE RMSE vs RK4 | per-sample median |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["solver"], r["grid"], r["nfe"])):
        median = f"{r['ode_median']:.4f}" if "ode_median" in r else "-"
        lines.append(f"| {r['solver']} | {r['grid']} | {r['nfe']} | {r['fd']:.3f} | {r['kid']:.4f} | "
                     f"{r['ode_rmse']:.4f} | {median} |")
    hf = result.get("head_fidelity")
    if hf:
        lines += ["", "Head vs exact JVP (held-out test images): relative L2 error per t-bin "
                  "(mean / pooled gamma-weighted)", "", "| t | mean | pooled |", "|---|---|---|"]
        lines += [f"| {r['t_lo']:.3f}-{r['t_hi']:.3f} | {r['rel_err_mean']:.3f} | {r.get('rel_err_pooled', float('nan')):.3f} |"
                  for r in hf["per_t_bin"]]
        lines.append(f"| all | {hf['rel_err_mean']:.3f} | {hf.get('rel_err_pooled_gamma_weighted', float('nan')):.3f} |")
    (OUT / "table.md").write_text("\n".join(lines) + "\n")
    for key, fname, ylabel in (("ode_rmse", "error_vs_nfe.png", "RMSE vs RK4 reference"),
                               ("fd", "fd_vs_nfe.png", "FD in classifier feature space")):
        plt.figure(figsize=(6, 4))
        for sg in sorted({(r["solver"], r["grid"]) for r in rows}):
            rs = sorted((r for r in rows if (r["solver"], r["grid"]) == sg), key=lambda r: r["nfe"])
            plt.plot([r["nfe"] for r in rs], [r[key] for r in rs], marker="o", label=f"{sg[0]} ({sg[1]})")
        plt.yscale("log")
        plt.xlabel("NFE")
        plt.ylabel(ylabel)
        plt.legend(fontsize=7)
        plt.tight_layout()
        plt.savefig(OUT / fname, dpi=120)
        plt.close()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
