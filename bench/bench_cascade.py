"""The cascade against the single-stage model: FD of its 32x32 samples, and each stage's ODE error
per solver (issue 32).

FD (``--part fd``): the feature space of bench_quality.py (its cached classifier), `--n` samples
per noise seed against the Fashion-MNIST test set, null class (no labels) in every stage, each
stage on its default grid (a tuned grid where the model stores one):

* the single-stage model (``--single``, default the bundled one) with its default solver at
  the NFEs of ``--single-nfes`` (noise as bench_quality.py: ``torch.randn`` of generator ``seed``);
* the cascade (``--cascade``) with solver S in both stages at budgets ``--budgets`` (base + upsampler
  NFE; the noise of `genie_fast.sample_cascade` for ``seed``), S in ``--solvers``.

ODE error (``--part ode``): per stage, the median over ``--n-ode`` samples of the per-sample RMS
distance between a solver's sample and RK4 of that stage's network (``--ref-steps`` steps uniform in
log gamma, float64; its distance to RK4 at half the steps is reported). The upsampler is run on
fixed inputs: the base stage's RK4 samples, noised at the cascade's augmentation level with fixed
noise, so its error is the upsampler's own.

Rows go to ``--out`` (JSON, resumable: a killed run keeps its finished rows) and a markdown table
is printed (``--table`` prints it from the JSON alone).

    PYTHONPATH=. python bench/bench_cascade.py --part fd --seeds 0,1 --n 512 --threads 1
    PYTHONPATH=. python bench/bench_cascade.py --part ode --n-ode 64 --threads 1
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

SOLVERS = ("genie_multistep", "genie", "ddim", "dpmpp_2m")
OUT = ROOT / "results" / "cascade" / "cascade.json"


def _median_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).pow(2).flatten(1).mean(1).sqrt().median())


@torch.no_grad()
def run_fd(args, result, save):
    import genie_fast
    from bench_quality import features, frechet_distance, get_classifier
    from genie_fast.cascade import load_cascade, sample_cascade
    from genie_fast.data import load_fashion_mnist
    from genie_fast.models.default import load_default, load_model
    from genie_fast.models.unet import downsample
    from genie_fast.solvers.options import DEFAULT_SOLVER

    cascade = load_cascade(args.cascade) if args.budgets else None  # --budgets "": the single-stage rows only
    single = load_default() if args.single is None else load_model(args.single)
    clf, _ = get_classifier()
    f_test = features(clf, load_fashion_mnist("test")[0])
    rows = result.setdefault("fd", [])
    done = {(r["what"], r["solver"], r["nfe"], r["seed"]) for r in rows}
    jobs = [("single", DEFAULT_SOLVER, nfe, seed) for nfe in filter(None, args.single_nfes.split(","))
            for seed in args.seeds]
    jobs += [("cascade", solver, budget, seed) for budget in filter(None, args.budgets.split(","))
             for solver in args.solvers for seed in args.seeds]
    for what, solver, nfe, seed in jobs:
        if (what, solver, nfe, seed) in done:
            continue
        t0, extra = time.time(), {}
        if what == "single":
            noise = torch.randn(args.n, *single.image_shape, generator=torch.Generator().manual_seed(seed))
            x, used = genie_fast.sample(single, noise=noise, solver=solver, nfe=int(nfe))
        else:
            n_base, n_up = (int(v) for v in nfe.split("+"))
            name, _, grid = solver.partition("@")  # "solver@grid": that grid in both stages (else each stage's auto)
            base, up = {"solver": name, "nfe": n_base}, {"solver": name, "nfe": n_up}
            if grid:
                base["grid"] = up["grid"] = grid
            x, used, x_low = sample_cascade(cascade, n=args.n, seed=seed, base=base, upsampler=up, return_low_res=True)
            # does the upsampler follow its input: its samples pooled back to 16x16 against the base samples
            extra["low_res_rms"] = _median_rms(downsample(x.clamp(-1, 1), x_low.shape[-1]), x_low.clamp(-1, 1))
        row = {**extra, "what": what, "solver": solver, "nfe": nfe, "nfe_used": int(used), "seed": seed, "n": args.n,
               "fd": frechet_distance(features(clf, x), f_test), "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        print(row, flush=True)
        save()


@torch.no_grad()
def run_ode(args, result, save):
    import genie_fast
    from genie_fast.cascade import load_cascade
    from genie_fast.guidance import conditioned
    from genie_fast.models.unet import augment_low_res
    from genie_fast.reference import rk4_solve

    cascade = load_cascade(args.cascade)
    g = torch.Generator().manual_seed(args.ode_seed)
    z_low = torch.randn(args.n_ode, *cascade.base.image_shape, generator=g)
    z_up = torch.randn(args.n_ode, *cascade.upsampler.image_shape, generator=g)
    z_aug = torch.randn(args.n_ode, *cascade.base.image_shape, generator=g)
    stages = result.setdefault("ode", {})

    def reference(name, model, noise, cond):
        path = Path(args.out).with_name(f"ode_ref_{name}.pt")  # a cache beside the JSON (not kept in git)
        if name not in stages or not path.exists():
            t0 = time.time()
            net = conditioned(model, None, None, len(noise), cond=cond) if cond else model

            def eps(x, t):  # the float32 network inside the float64 integrator
                return net(x.float(), t.float())
            sched = model.schedule
            ref = rk4_solve(eps, noise, sched, 1.0, sched.t_end, args.ref_steps).float()
            half = rk4_solve(eps, noise, sched, 1.0, sched.t_end, args.ref_steps // 2).float()
            stages.setdefault(name, {"rows": []}).update(
                ref_steps=args.ref_steps, ref_vs_half_median=_median_rms(ref, half), ref_seconds=round(time.time() - t0, 1))
            torch.save(ref, path)
            save()
        return torch.load(path)

    ref_low = reference("base", cascade.base, z_low, None)
    stage_list = [("base", cascade.base, z_low, ref_low, None)]
    if "upsampler" not in args.stages:
        return _ode_rows(args, stages, stage_list, save)
    level = torch.full((args.n_ode,), cascade.aug_level, dtype=torch.float64)
    y = augment_low_res(ref_low.clamp(-1, 1), level, cascade.upsampler.schedule, noise=z_aug)
    cond = {"low_res": y, "aug_level": level.float()}
    ref_up = reference("upsampler", cascade.upsampler, z_up, cond)
    stage_list.append(("upsampler", cascade.upsampler, z_up, ref_up, cond))
    _ode_rows(args, stages, [s for s in stage_list if s[0] in args.stages], save)


def _ode_rows(args, stages, stage_list, save):
    import genie_fast

    for name, model, noise, ref, c in stage_list:
        rows = stages[name]["rows"]
        done = {(r["solver"], r["nfe"]) for r in rows}
        for nfe in (int(v) for v in args.nfes.split(",")):
            for solver in args.solvers:
                if (solver, nfe) in done:
                    continue
                x, used = genie_fast.sample(model, noise=noise, solver=solver, nfe=nfe, cond=c)
                rows.append({"solver": solver, "nfe": nfe, "nfe_used": int(used), "median": _median_rms(x, ref)})
                print(name, rows[-1], flush=True)
                save()


@torch.no_grad()
def run_head(args, result, save):
    """Each stage's head against the exact JVP on held-out test images (the measure `head_error` stores:
    pooled over samples and pixels, gamma-weighted): x_t of test images at the stage's size (the
    upsampler's low-resolution input drawn as in its training), t stratified over [t_end, 1], half the
    samples with their label, half the null class."""
    from genie_fast.cascade import load_cascade
    from genie_fast.data import load_fashion_mnist
    from genie_fast.ops import head_combine_ref
    from genie_fast.schedule import q_sample
    from genie_fast.training.cascade import fit_images, low_res_cond
    from genie_fast.training.distill import distill_target

    cascade = load_cascade(args.cascade)
    x_test, y_test = load_fashion_mnist("test")
    g = torch.Generator().manual_seed(args.ode_seed)
    out = result.setdefault("head", {})
    for name, model in (("base", cascade.base), ("upsampler", cascade.upsampler)):
        cfg, sched, n = model.unet.config, model.schedule, args.n_head
        x0 = fit_images(x_test[:n], cfg)
        labels = torch.where(torch.arange(n) % 2 == 0, y_test[:n], torch.full((n,), model.num_classes))
        t = sched.t_end + (1 - sched.t_end) * (torch.arange(n) + torch.rand(n, generator=g)) / n
        x_t, t, _ = q_sample(x0, sched, g, t=t)
        cond = low_res_cond(x0, cfg, args.aug_max, sched, g) if cfg.low_res_size else {}
        num = den = 0.0
        for i in range(0, n, 32):
            sl = slice(i, i + 32)
            c = {k: v[sl] for k, v in cond.items()}
            eps, feats, temb = model.unet(x_t[sl], t[sl], return_features=True, labels=labels[sl], **c)
            _, goal = distill_target(lambda x, tt: model.unet(x, tt, labels=labels[sl], **c), x_t[sl], t[sl], sched,
                                     eps=eps)
            gamma = sched.gamma(t[sl].double()).float().view(-1, 1, 1, 1)
            deps = head_combine_ref(model.head(x_t[sl], eps, feats, temb), gamma)
            num += float((gamma * (deps - goal)).pow(2).sum())
            den += float((gamma * goal).pow(2).sum())
        out[name] = {"n": n, "pooled_gamma_weighted": (num / den) ** 0.5}
        print(name, out[name], flush=True)
        save()


def table(result) -> str:
    lines = []
    fd = result.get("fd", [])
    if fd:
        lines += ["| sampler | solver | NFE | FD per seed | FD sum | low-res RMS |", "|---|---|---|---|---:|---:|"]
        keys = sorted({(r["what"], r["solver"], r["nfe"]) for r in fd},
                      key=lambda k: (k[0] != "single", -sum(map(int, k[2].split("+"))), SOLVERS.index(k[1].partition("@")[0]), k[1]))
        for what, solver, nfe in keys:
            same = [r for r in fd if (r["what"], r["solver"], r["nfe"]) == (what, solver, nfe)]
            vals, low = [r["fd"] for r in same], [r["low_res_rms"] for r in same if "low_res_rms" in r]
            lines.append(f"| {what} | {solver} | {nfe} | {' / '.join(f'{v:.1f}' for v in vals)} | "
                         f"{sum(vals):.1f} | {f'{statistics.mean(low):.3f}' if low else ''} |")
    for name, h in result.get("head", {}).items():
        lines.append(f"\n{name} head: {h['pooled_gamma_weighted']:.3f} off the exact JVP (pooled, gamma-weighted, "
                     f"{h['n']} test images)")
    for name, stage in result.get("ode", {}).items():
        rows = stage["rows"]
        nfes = sorted({r["nfe"] for r in rows})
        lines += ["", f"{name}: median ODE error vs RK4 ({stage['ref_steps']} steps; vs half "
                      f"{stage['ref_vs_half_median']:.1e})", "",
                  "| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---:|" * len(nfes)]
        for solver in dict.fromkeys(r["solver"] for r in rows):
            cells = [next((f"{r['median']:.4f}" for r in rows if (r["solver"], r["nfe"]) == (solver, n)), "")
                     for n in nfes]
            lines.append(f"| {solver} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("fd", "ode", "head"), action="append", help="what to measure (repeatable)")
    p.add_argument("--cascade", default=None, help="cascade file (default: the bundled one)")
    p.add_argument("--single", default=None, help="single-stage model stem (default: the bundled model)")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1])
    p.add_argument("--single-nfes", default="20,10")
    p.add_argument("--budgets", default="10+10,5+5", help="base+upsampler NFE, comma-separated")
    p.add_argument("--solvers", type=lambda s: s.split(","), default=list(SOLVERS),
                   help="comma-separated; --part fd takes solver@grid too (that grid in both stages)")
    p.add_argument("--n-ode", type=int, default=64)
    p.add_argument("--ode-seed", type=int, default=7)
    p.add_argument("--nfes", default="5,10", help="--part ode: NFEs per stage")
    p.add_argument("--stages", type=lambda v: v.split(","), default=["base", "upsampler"],
                   help="--part ode: the stages to measure (the upsampler's inputs come from the base's reference)")
    p.add_argument("--ref-steps", type=int, default=100)
    p.add_argument("--n-head", type=int, default=256, help="--part head: test images per stage")
    p.add_argument("--aug-max", type=float, default=0.3, help="--part head: the upsampler's training --aug-max")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--table", action="store_true", help="print the table of --out and stop")
    args = p.parse_args(argv)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    if args.table:
        print(table(result))
        return
    torch.set_num_threads(args.threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.setdefault("machine", {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                                  "threads": args.threads})

    def save():
        out.write_text(json.dumps(result, indent=1) + "\n")

    for part in args.part or ("fd", "ode", "head"):
        {"fd": run_fd, "ode": run_ode, "head": run_head}[part](args, result, save)
    print(table(result))


if __name__ == "__main__":
    main()
