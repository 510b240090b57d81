"""Classifier-free guidance on the class-conditional bundled model: what guidance costs GENIE's
head, and what it buys in class accuracy and sample quality.

Parts (``--only``; all by default, each writes its rows into bench/results/guidance/guidance.json as it goes,
a rerun skips rows already there for the same model and settings):

* ``term``: the part of d eps_g / d gamma along the guided ODE that the linear combination of the
  two branches' heads cannot see, s (s - 1) (J_c - J_u)(eps_c - eps_u) / sqrt(1 + gamma^2), relative to
  the exact guided derivative (one JVP of the guided eps), pooled with GENIE's gamma weighting, at
  points of guided trajectories (DPM-Solver++(2M), 15 logSNR steps from t = 1 to each t).
* ``classes``: our Fashion-MNIST classifier (bench/results/quality/classifier.safetensors, test accuracy
  in its JSON) on unconditional samples and on real test images: mean top-class probability and
  the class histogram (a well-spread model has about n/10 per class).
* ``scales``: class accuracy (classifier's top class == the label asked for), FD in the
  classifier's features against the test set, for guidance scales 0, 1, 1.5, 2, 3, 5 at NFE 10,
  solvers genie, ddim, dpmpp_2m.
* ``nfe``: at the default scale, GENIE against DDIM and DPM-Solver++(2M) at 5-20 steps: FD, accuracy
  and the error against a high-accuracy solution of the same guided ODE (RK4, 100 steps).
* ``encode``: encode-then-decode reconstruction error and the latents' error against a reference
  encoding, per solver and steps, on held-out test images; a figure of slerp interpolations.

Writes bench/results/guidance/{guidance.json, table.md, guidance.png, interpolation.png}.

NFE here is network evaluations per sample (a guided step evaluates both branches: 2); the batched
calls are half of that. Every solver runs on its default grid (grid="auto") with AFS (the library's
defaults); rows are taken at equal steps, i.e. equal batched calls.

    python bench/bench_guidance.py --threads 2                      # everything, bundled model
    python bench/bench_guidance.py --only term --n 32               # the head-combination term
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

SCALES = (0.0, 1.0, 1.5, 2.0, 3.0, 5.0)
TERM_TIMES = (0.9, 0.6, 0.4, 0.25, 0.15, 0.08, 0.04)


def load(args):
    from genie_fast.distill import with_trained_unet

    return with_trained_unet(args.model, args.unet_ckpt)  # --unet-ckpt: a network still in training


def guided_points(model, labels, scale, t_to, noise):
    """x on the guided ODE at time t_to (DPM-Solver++(2M), 15 logSNR steps from t = 1)."""
    import genie_fast
    from genie_fast.schedule import time_grid

    ts = time_grid(model.schedule, 15, "logsnr", t_end=t_to)
    x, _ = genie_fast.sample(model, noise=noise, solver="dpmpp_2m", grid=ts, afs=False, labels=labels,
                             guidance_scale=scale)
    return x


def part_term(model, args, rows):
    from genie_fast.guidance import Conditioned
    from genie_fast.solvers import exact_deps, jvp

    s_ = model.schedule
    g = torch.Generator().manual_seed(args.seed)
    n = args.n_term
    noise = torch.randn(n, *model.image_shape, generator=g)
    labels = torch.arange(n) % model.num_classes
    null = torch.full_like(labels, model.num_classes)
    for scale in (1.5, 2.0, 3.0, 5.0):
        if any(r.get("part") == "term" and r["scale"] == scale for r in rows):
            continue
        per_t, num_w, den_w = [], 0.0, 0.0
        for t_val in TERM_TIMES:
            with torch.no_grad():
                x = guided_points(model, labels, scale, t_val, noise)
            t = torch.full((n,), t_val)
            guided = Conditioned(model, labels, scale)
            with torch.no_grad():
                eps_g = guided(x, t)
                delta = model(x, t, labels=labels) - model(x, t, labels=null)
            exact = exact_deps(guided, x, t, eps_g, s_)
            with torch.no_grad():
                jc = jvp(lambda x_: model(x_, t, labels=labels), (x,), (delta,))[1]
                ju = jvp(lambda x_: model(x_, t, labels=null), (x,), (delta,))[1]
            gam = float(s_.gamma(t_val))
            term = scale * (scale - 1) * (jc - ju) / math.sqrt(1 + gam * gam)
            rel = float(term.norm() / exact.norm())
            per_t.append({"t": t_val, "rel": rel})
            num_w += gam ** 2 * float(term.square().sum())
            den_w += gam ** 2 * float(exact.square().sum())
            print(f"term s={scale} t={t_val}: |term|/|exact| = {rel:.3f}", flush=True)
        rows.append({"part": "term", "scale": scale, "per_t": per_t, "pooled_gamma_weighted": math.sqrt(num_w / den_w),
                     "n": n})
        yield


def classify(clf, x):
    with torch.no_grad():
        p = torch.cat([torch.softmax(clf(x[i:i + 500].clamp(-1, 1)), 1) for i in range(0, len(x), 500)])
    return p


def class_stats(p):
    return {"mean_top_prob": float(p.max(1).values.mean()),
            "histogram": torch.bincount(p.argmax(1), minlength=10).tolist()}


def sample_guided(model, noise, labels, scale, solver, steps, grid="auto"):
    """Samples with `steps` steps (each 1 or 2 network evaluations per sample); returns (x0, NFE per sample)."""
    import genie_fast

    return genie_fast.sample(model, noise=noise, solver=solver, steps=steps, grid=grid, labels=labels,
                             guidance_scale=scale)


ENC_SOLVERS = ("ddim", "genie", "dpmpp_2m", "unipc", "heun", "genie_exact", "dpm_solver_2", "dpmpp_3m", "ipndm",
               "genie_multistep")
ENC_STEPS = (5, 10, 20, 40)
# (solver, grid) runs: every solver on its auto grid, and the logSNR grid (fine steps at the data end,
# where encoding starts) for those whose auto grid is not logSNR
ENC_RUNS = [(s, "auto") for s in ENC_SOLVERS] + [(s, "logsnr") for s in (
    "ddim", "genie", "dpmpp_2m", "unipc", "genie_multistep", "heun", "ipndm", "dpm_solver_2", "genie_exact")]


def slerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """Spherical interpolation of two latents (Gaussian latents keep their norm this way)."""
    fa, fb = a.flatten(), b.flatten()
    omega = torch.arccos((fa @ fb / (fa.norm() * fb.norm())).clamp(-1, 1))
    return (torch.sin((1 - w) * omega) * a + torch.sin(w * omega) * b) / torch.sin(omega)


def part_encode(model, args, rows, save):
    """Encode held-out test images and decode them with the same solver and steps (AFS off):
    reconstruction RMSE, and the latents' RMSE against a reference encoding (DPM-Solver++(3M), 400
    logSNR steps, checked against 200). Also a figure of slerp interpolations between two latents."""
    import genie_fast
    from genie_fast.cli import save_grid
    from genie_fast.data import load_fashion_mnist

    x_test, _ = load_fashion_mnist("test")
    g = torch.Generator().manual_seed(args.seed + 1)
    x0 = x_test[torch.randperm(len(x_test), generator=g)[: args.n_enc]]
    ref_path = Path(args.out) / "encode_reference.pt"  # not in git (*.pt): remade when missing
    if not ref_path.exists() or not any(r.get("part") == "encode_reference" for r in rows):
        rows[:] = [r for r in rows if r.get("part") != "encode_reference"]
        t0 = time.time()
        ref = genie_fast.encode(model, x0, solver="dpmpp_3m", steps=400, grid="logsnr")[0]
        half = genie_fast.encode(model, x0, solver="dpmpp_3m", steps=200, grid="logsnr")[0]
        torch.save(ref, ref_path)
        rows.append({"part": "encode_reference", "solver": "dpmpp_3m", "steps": 400,
                     "rmse_vs_200_steps": float((ref - half).pow(2).mean().sqrt()), "seconds": time.time() - t0})
        save()
    ref = torch.load(ref_path, weights_only=True)
    for solver, grid in ENC_RUNS:
        for steps in ENC_STEPS:
            if any(r.get("part") == "encode" and r["solver"] == solver and r["steps"] == steps
                   and r.get("grid", "auto") == grid for r in rows):
                continue
            t0 = time.time()
            z, nfe = genie_fast.encode(model, x0, solver=solver, steps=steps, grid=grid)
            back, nfe_back = genie_fast.sample(model, noise=z, solver=solver, steps=steps, grid=grid, afs=False)
            rows.append({"part": "encode", "solver": solver, "steps": steps, "grid": grid, "nfe_encode": nfe,
                         "nfe_decode": nfe_back, "reconstruction_rmse": float((back - x0).pow(2).mean().sqrt()),
                         "latent_rmse_vs_reference": float((z - ref).pow(2).mean().sqrt()),
                         "seconds": time.time() - t0})
            print(rows[-1], flush=True)
            save()
    # interpolation between two test images (latents by DPM-Solver++(2M), 50 steps)
    pair = x0[:2]
    z, _ = genie_fast.encode(model, pair, solver="dpmpp_2m", steps=50)
    ws = torch.linspace(0, 1, 8).tolist()
    zs = torch.stack([slerp(z[0], z[1], w) for w in ws])
    imgs, _ = genie_fast.sample(model, noise=zs, solver="dpmpp_2m", steps=50, afs=False)
    save_grid(torch.cat([pair[:1], imgs, pair[1:]]), Path(args.out) / "interpolation.png", nrow=10)


def write_table(result, out: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    lines = []
    term = [r for r in rows if r.get("part") == "term"]
    if term:
        times = [p["t"] for p in term[0]["per_t"]]
        lines += ["Missing term / exact guided derivative (per t; pooled gamma-weighted)", "",
                  "| s | " + " | ".join(f"t={t}" for t in times) + " | pooled |",
                  "|---|" + "---|" * (len(times) + 1)]
        lines += [f"| {r['scale']} | " + " | ".join(f"{p['rel']:.3f}" for p in r["per_t"])
                  + f" | {r['pooled_gamma_weighted']:.3f} |" for r in term]
    for part in ("scales", "nfe"):
        rs = [r for r in rows if r.get("part") == part]
        if rs:
            lines += ["", f"Part {part}", "", "| solver | steps | NFE | scale | accuracy | top prob | FD | ODE RMSE |",
                      "|---|---|---|---|---|---|---|---|"]
            lines += [f"| {r['solver']} | {r['steps']} | {r['nfe']} | {r['scale']} | {r['accuracy']:.3f} | "
                      f"{r['mean_top_prob']:.3f} | {r['fd']:.2f} | {r.get('ode_rmse', float('nan')):.4f} |"
                      for r in rs]
    enc = [r for r in rows if r.get("part") == "encode"]
    if enc:
        lines += ["", "Encoding (reconstruction RMSE / latent RMSE vs reference)", "",
                  "| solver | " + " | ".join(f"{s} steps" for s in ENC_STEPS) + " |", "|---|" + "---|" * len(ENC_STEPS)]
        for solver, grid in ENC_RUNS:
            cells = []
            for st in ENC_STEPS:
                r = next((r for r in enc if r["solver"] == solver and r["steps"] == st
                          and r.get("grid", "auto") == grid), None)
                cells.append("" if r is None else f"{r['reconstruction_rmse']:.4g} / {r['latent_rmse_vs_reference']:.4g}")
            lines.append(f"| {solver}, {grid} | " + " | ".join(cells) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for solver in ("genie", "ddim", "dpmpp_2m"):
        rs = sorted((r for r in rows if r.get("part") == "scales" and r["solver"] == solver), key=lambda r: r["scale"])
        if rs:
            axes[0].plot([r["scale"] for r in rs], [r["accuracy"] for r in rs], marker="o", label=solver)
            axes[1].plot([r["scale"] for r in rs], [r["fd"] for r in rs], marker="o", label=solver)
        rs = sorted((r for r in rows if r.get("part") == "nfe" and r["solver"] == solver), key=lambda r: r["steps"])
        if rs:
            axes[2].plot([r["nfe"] for r in rs], [r["ode_rmse"] for r in rs], marker="o", label=solver)
    axes[0].set(xlabel="guidance scale s (10 steps)", ylabel="class accuracy (our classifier)")
    axes[1].set(xlabel="guidance scale s (10 steps)", ylabel="FD in classifier features")
    axes[2].set(xlabel="NFE per sample (2 per guided step)", ylabel="RMSE vs RK4 of the guided ODE", yscale="log")
    for a in axes:
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "guidance.png", dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["term", "classes", "scales", "nfe", "encode"], action="append")
    p.add_argument("--n", type=int, default=500, help="samples per row for accuracy and FD")
    p.add_argument("--n-term", type=int, default=32, help="trajectories for the term measurement")
    p.add_argument("--n-ode", type=int, default=32, help="samples for the ODE error against RK4")
    p.add_argument("--n-enc", type=int, default=32, help="held-out test images for encoding")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="model stem (default: bundled)")
    p.add_argument("--unet-ckpt", default=None, help="a training checkpoint's EMA network instead (head from --model); "
                   "several, comma-separated: their average")
    p.add_argument("--out", default=str(ROOT / "results" / "guidance"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = args.only or ["term", "classes", "scales", "nfe", "encode"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from bench_quality import features, frechet_distance, get_classifier, rk4_reference
    from genie_fast.data import load_fashion_mnist

    model = load(args)
    if not model.num_classes and parts != ["classes"]:
        raise SystemExit("the model is not class-conditional (only --only classes runs on it)")
    key = {"model_provenance": getattr(model, "provenance", {}), "n": args.n, "n_term": args.n_term,
           "n_ode": args.n_ode, "n_enc": args.n_enc, "seed": args.seed}
    res_path = out / "guidance.json"
    result = {**key, "rows": []}
    if res_path.exists():
        old = json.loads(res_path.read_text())
        if all(old.get(k) == v for k, v in key.items()):
            result = old
    result.update({"device": platform.processor() or platform.machine(), "torch": torch.__version__,
                   "threads": args.threads})
    rows = result["rows"]

    def save():
        res_path.write_text(json.dumps(result, indent=2))

    if "term" in parts:
        for _ in part_term(model, args, rows):
            save()

    clf, acc = get_classifier()
    result["classifier_test_accuracy"] = acc
    x_test, y_test = load_fashion_mnist("test")
    f_test = features(clf, x_test)
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.n, *model.image_shape, generator=g)
    labels = torch.arange(args.n) % max(1, model.num_classes)

    def done(**kw):
        return any(all(r.get(k) == v for k, v in kw.items()) for r in rows)

    if "classes" in parts and not done(part="classes"):
        real = class_stats(classify(clf, x_test[: args.n]))
        x0, _ = sample_guided(model, noise, None, None, "dpmpp_2m", 20)
        uncond = class_stats(classify(clf, x0))
        rows.append({"part": "classes", "real_test_images": real, "unconditional_dpmpp_2m_nfe20": uncond,
                     "fd_unconditional": frechet_distance(features(clf, x0), f_test)})
        print(rows[-1], flush=True)
        save()

    def measure(part, solver, steps, scale, ref=None):
        if done(part=part, solver=solver, steps=steps, scale=scale):
            return
        t0 = time.time()
        x0, nfe = sample_guided(model, noise, labels, scale, solver, steps)
        pr = classify(clf, x0)
        row = {"part": part, "solver": solver, "grid": "auto", "afs": True, "steps": steps, "scale": scale,
               "nfe": nfe, "batched_calls": nfe // (1 if scale == 1.0 else 2),
               "accuracy": float((pr.argmax(1) == labels).float().mean()),
               "mean_top_prob": float(pr.max(1).values.mean()),
               "fd": frechet_distance(features(clf, x0), f_test), "seconds": time.time() - t0}
        if ref is not None:
            row["ode_rmse"] = float((x0[: len(ref)] - ref).pow(2).mean().sqrt())
        rows.append(row)
        print(row, flush=True)
        save()

    # Steps, not NFE: a guided step costs 2 network evaluations per sample (one batched call), the same
    # for every solver here, so "10 steps" is the paper's NFE 10 of batched calls (20 evaluations).
    solvers = ("genie", "ddim", "dpmpp_2m")
    if "scales" in parts:
        for scale in SCALES:
            for solver in solvers:
                measure("scales", solver, 10, scale)
    if "nfe" in parts:
        from genie_fast.guidance import DEFAULT_GUIDANCE_SCALE, Conditioned
        scale = DEFAULT_GUIDANCE_SCALE
        guided = Conditioned(model, labels[: args.n_ode], scale)
        ref = rk4_reference(guided, model.schedule, noise[: args.n_ode], 100)
        for steps in (5, 10, 15, 20):
            for solver in solvers:
                measure("nfe", solver, steps, scale, ref)
    if "encode" in parts:
        part_encode(model, args, rows, save)
    save()
    write_table(result, out)


if __name__ == "__main__":
    main()
