"""A diffusers UNet2DModel trained here, its distilled GENIE heads, and GENIE vs DDIM vs DPM-Solver++.

    python bench/bench_diffusers.py --out runs_diffusers/fmnist16 --train-minutes 7 --distill-steps 400 \
        --targets jvp,secant --span-t 0.01 --results bench/results/diffusers/diffusers_secant.json
    python bench/bench_diffusers.py --out runs_diffusers/fmnist16c --continuous-t --train-minutes 7 \
        --distill-steps 400 --targets jvp,secant,jvp@800,jvp@1200,jvp@1600 --span-t 0.01 \
        --results bench/results/diffusers/diffusers_continuous.json

Phases (each skipped when its output exists, so a rerun only evaluates):
1. train a small UNet2DModel (16x16 Fashion-MNIST: the padded 32x32 images average-pooled 2x2;
   channels (32, 64), attention at 8x8, 1000-step linear DDPM betas, epsilon prediction) for
   --train-minutes of this process's CPU time, EMA weights saved with save_pretrained as a pipeline folder;
   at diffusers' integer timesteps, or with --continuous-t at genie_fast time t ~ U[1/N, 1] (fractional
   timesteps N t - 1, alpha and sigma of genie_fast's schedule: the model genie_fast samples);
2. distil one GENIE head per --targets entry ("jvp", "secant" at --span-t, or "secant:S" at span S;
   "@STEPS" for STEPS steps instead of --distill-steps, continued from the same target's shorter run)
   with the command line a user runs:
   ``genie-fast distill --diffusers <out>/model --data <out>/train16.npz --steps N --target T [--span-t S]``
   (run folder <out>/distill_<name>, head <out>/heads/<name>);
3. measure on held-out data: each head's relative L2 error against the exact JVP (d eps / d gamma)
   and against the secant targets (at --span-t and each head's span), per t bin; and the sampling error of ddim /
   dpmpp_2m (with and without AFS) / genie with the exact JVP, and per head genie / genie_multistep
   (with and without AFS), at NFE 5-20 against a float64-state RK4 reference of the same ODE
   (--rk4-steps steps uniform in log gamma, kept in <out>/reference.pt; logSNR grids for the
   solvers, t from 1 to 1/N), as RMSE over pixels and samples in [-1, 1] units; and the size of
   the time derivative's roughness (the exact d eps / dt part of the JVP against a 10-step secant,
   against secants over 0.01-100 timesteps, and against itself up to 13 timesteps later) at a few
   timesteps.
Writes --results (JSON) and prints the tables for bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import genie_fast
from genie_fast.data import load_fashion_mnist
from genie_fast.distill import distill_target
from genie_fast.ops import head_combine_ref
from genie_fast.models.diffusers import load_diffusers
from genie_fast.reference import rk4_solve
from genie_fast.sampling import make_noise
from genie_fast.solvers import exact_deps

NFES = (5, 8, 10, 15, 20)
ROUGHNESS_SPANS = (0.01, 0.1, 1, 3, 10, 30, 100)  # timesteps, for time_roughness's t_part_rel_diff
COS_OFFSETS = 27  # time_roughness's t_part_cos: offsets 0, 0.5, ..., 13 timesteps
# rows without a head, then the rows run once per distilled head
PLAIN_SOLVERS = ("ddim", "ddim + AFS", "dpmpp_2m", "dpmpp_2m + AFS", "unipc", "unipc + AFS", "genie (exact JVP)",
                 "genie_multistep (zero head)")
HEAD_SOLVERS = ("genie", "genie + AFS", "genie_multistep", "genie_multistep + AFS",
                "genie_multistep + AFS, measured head_error")


def fmnist16(split):
    x, y = load_fashion_mnist(split)
    return F.avg_pool2d(x, 2), y


def train(out: Path, minutes: float, batch: int, lr: float, seed: int, continuous_t: bool = False):
    """continuous_t False: diffusers' DDPM training, integer timesteps k ~ U{0..N-1} at alpha_bar[k].
    True: genie_fast time t ~ U[t_end, 1] (t_end = 1/N) of the scheduler's DiffusersSchedule, x_t at its
    alpha(t), sigma(t) (log alpha linear in t between the steps) and the UNet at the fractional timestep
    tau = N t - 1 (`step_of_time`): the continuous-time model that genie_fast samples and distils."""
    import diffusers

    from genie_fast.models.diffusers import DiffusersSchedule

    x, _ = fmnist16("train")
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                 attention_head_dim=32)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    ema = diffusers.UNet2DModel.from_config(unet.config)
    ema.load_state_dict(unet.state_dict())
    opt = torch.optim.Adam(unet.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    ac = scheduler.alphas_cumprod
    schedule = DiffusersSchedule.from_config(scheduler)
    # the budget is this process's CPU time (one thread), so a run on a loaded machine takes as many steps
    t0, c0, step, losses = time.time(), time.process_time(), 0, []
    while time.process_time() - c0 < 60 * minutes:
        idx = torch.randint(len(x), (batch,), generator=gen)
        x0 = x[idx]
        if continuous_t:
            t = schedule.t_end + (1.0 - schedule.t_end) * torch.rand(batch, generator=gen, dtype=torch.float64)
            z = torch.randn(x0.shape, generator=gen)
            a = schedule.alpha(t).float()[:, None, None, None]
            x_t = a * x0 + schedule.sigma(t).float()[:, None, None, None] * z
            k = schedule.step_of_time(t).float()  # tau in [0, N - 1]
        else:
            k = torch.randint(1000, (batch,), generator=gen)
            z = torch.randn(x0.shape, generator=gen)
            a = ac[k].sqrt()[:, None, None, None]
            x_t = a * x0 + (1 - a * a).sqrt() * z
        loss = F.mse_loss(unet(x_t, k).sample, z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 200)
        opt.step()
        step += 1
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item())
        if step % 100 == 0:
            print(f"train step {step} loss {np.mean(losses[-100:]):.4f} {time.time() - t0:.0f}s", flush=True)
    ema.eval().save_pretrained(out / "model" / "unet")
    scheduler.save_pretrained(out / "model" / "scheduler")
    info = {"timesteps": "continuous" if continuous_t else "integer", "steps": step, "batch": batch, "lr": lr,
            "wall_s": round(time.time() - t0, 1),
            "cpu_s": round(time.process_time() - c0, 1),
            "final_loss_100": float(np.mean(losses[-100:])), "params": sum(p.numel() for p in unet.parameters())}
    (out / "train.json").write_text(json.dumps(info, indent=2))
    return info


def parse_target(spec: str, span_t: float, default_steps: int) -> tuple[str, str, float | None, int]:
    """(name, target, span, steps) of a --targets entry: "jvp", "secant" (at --span-t) or "secant:S",
    each optionally "@STEPS" (distillation steps instead of --distill-steps; the name then ends in
    "_STEPSsteps", e.g. "jvp@1600" -> jvp_1600steps)."""
    spec, _, steps = spec.partition("@")
    target, _, span = spec.partition(":")
    if target == "jvp" and not span:
        name, span_t = "jvp", None
    elif target == "secant":
        span_t = float(span) if span else span_t
        name = f"secant_{span_t:g}"
    else:
        raise SystemExit(f"--targets: unknown entry {spec!r} (jvp, secant or secant:SPAN, optionally @STEPS)")
    if steps:
        return f"{name}_{int(steps)}steps", target, span_t, int(steps)
    return name, target, span_t, default_steps


def resume_source(out: Path, heads, name: str, target: str, span_t, steps: int):
    """The run folder of the longest shorter distillation of the same target and span in <out> (one of
    ``heads``), whose checkpoint a longer run continues from instead of starting over; None if none."""
    best = None
    for other, t2, s2, n2 in heads:
        run = out / f"distill_{other}"
        if other != name and (t2, s2) == (target, span_t) and n2 < steps and (run / "ckpt.pt").exists():
            if best is None or n2 > best[1]:
                best = (run, n2)
    return best and best[0]


def distill(out: Path, name: str, target: str, span_t, steps: int, threads: int, start_from: Path | None = None):
    """``genie-fast distill --diffusers`` to ``steps`` in <out>/distill_<name>; resumed from its own
    checkpoint, or, for a new run, from a copy of ``start_from``'s checkpoint (and log) when given."""
    if not (out / "train16.npz").exists():
        x, _ = fmnist16("train")
        u8 = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        np.savez(out / "train16.npz", arr_0=u8)
    run = out / f"distill_{name}"
    if start_from is not None and not (run / "ckpt.pt").exists():
        run.mkdir(parents=True, exist_ok=True)
        for f in ("ckpt.pt", "log.txt"):
            shutil.copy2(start_from / f, run / f)
        print(f"{run}: continuing from a copy of {start_from}", flush=True)
    cmd = [sys.executable, "-m", "genie_fast.cli", "distill", "--diffusers", str(out / "model"),
           "--out", str(run), "--head-out", str(out / "heads" / name), "--data", str(out / "train16.npz"),
           "--steps", str(steps), "--batch", "32", "--threads", str(threads), "--log-every", "25", "--lr", "1e-3",
           "--warmup", "50", "--target", target]
    if span_t is not None:
        cmd += ["--span-t", f"{span_t:g}"]
    if (run / "ckpt.pt").exists():
        cmd.append("--resume")
    print(" ".join(cmd), flush=True)
    t0, c0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True)
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"steps": steps, "target": target, "span_t": span_t,
            "continued_from": None if start_from is None else str(start_from), "wall_s": round(time.time() - t0, 1),
            "cpu_s": round(c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime, 1), "command": " ".join(cmd[1:])}


def head_error_bins(model, n: int, seed: int, spans):
    """Per t bin: x_t = alpha x0 + sigma z from test images, eps, the head's inputs, and the targets
    {"jvp": exact JVP, "secant_S": secant over span S for S in spans} (computed once, for every head)."""
    x, _ = fmnist16("test")
    gen = torch.Generator().manual_seed(seed)
    x0 = x[torch.randint(len(x), (n,), generator=gen)]
    bins = {}
    edges = (1e-3, 0.1, 0.3, 0.6, 1.0)
    net, s = model, model.schedule
    for lo, hi in zip(edges[:-1], edges[1:]):
        t = lo + (hi - lo) * torch.rand(n, generator=gen)
        a, sg = s.alpha(t)[:, None, None, None], s.sigma(t)[:, None, None, None]
        x_t = a * x0 + sg * torch.randn(x0.shape, generator=gen)
        with torch.no_grad():
            eps, feats, temb = net(x_t, t, return_features=True)
            targets = {"jvp": distill_target(net, x_t, t, s, "jvp", eps=eps)[1]}
            for span in spans:
                targets[f"secant_{span:g}"] = distill_target(net, x_t, t, s, "secant", span, eps=eps)[1]
        bins[f"{lo:g}-{hi:g}"] = (x_t, t, eps, feats, temb, targets)
    return bins


def _rel(a, b):
    return float((a - b).flatten(1).norm(dim=1).div(b.flatten(1).norm(dim=1).clamp_min(1e-12)).mean())


@torch.no_grad()
def head_error(head, schedule, bins):
    """Relative L2 error of the head's d eps / d gamma against each target, per t bin."""
    rows = {}
    for key, (x_t, t, eps, feats, temb, targets) in bins.items():
        gamma = schedule.gamma(t)[:, None, None, None].to(x_t.dtype)
        deps = head_combine_ref(head(x_t, eps, feats, temb), gamma)
        for name, target in targets.items():
            rows.setdefault(name, {})[key] = _rel(deps, target)
    return rows


@torch.no_grad()
def time_roughness(model, n: int, seed: int):
    """Norms of the two parts of the JVP target at x_t from test images, at timesteps k: the x part
    (J_x eps . dx/dgamma), the exact t part (d eps/dt . dt/dgamma) and the same t part from a secant
    over 10 timesteps. A network trained at integer timesteps only may wiggle between them; the
    exact t derivative then carries the wiggle, the secant does not. "t_part_rel_diff": the relative
    L2 difference of the t part as a central secant over ROUGHNESS_SPANS timesteps against the exact
    one (None where the span leaves [t_end, 1]); ~0 at every span a solver step covers if eps is
    smooth in t, ~1 where the exact derivative says nothing about the change over the span.
    "t_part_cos": the cosine (mean over the images) between the exact t part at timestep k and at
    k + j / 2 for j = 0..COS_OFFSETS - 1 (same x_t): a sign flip every ~3 timesteps is an oscillation of
    eps in t with period 2 pi timesteps, the fastest sinusoid of the UNet's positional timestep embedding."""
    from genie_fast.distill import ode_tangents
    from genie_fast.solvers import jvp

    x, _ = fmnist16("test")
    gen = torch.Generator().manual_seed(seed)
    x0 = x[torch.randint(len(x), (n,), generator=gen)]
    s, net, rows = model.schedule, model, {}
    for k in (100, 300, 600, 900, 990):
        t = torch.full((n,), (k + 1) / 1000)
        x_t = (s.alpha(t)[:, None, None, None] * x0 + s.sigma(t)[:, None, None, None] * torch.randn(x0.shape, generator=gen))
        eps = net(x_t, t)
        dx, dt = ode_tangents(eps, x_t, t, s)
        _, d_x = jvp(net, (x_t, t), (dx, torch.zeros_like(dt)))
        _, d_t = jvp(net, (x_t, t), (torch.zeros_like(dx), dt))
        secant = (net(x_t, t + 0.005) - net(x_t, t - 0.005)) / 0.01 * dt[:, None, None, None]
        rows[k] = {"x_part": float(d_x.norm()), "t_part_exact": float(d_t.norm()),
                   "t_part_secant10": float(secant.norm()), "total_exact": float((d_x + d_t).norm()),
                   "total_secant10": float((d_x + secant).norm())}
        print(f"k={k}: " + ", ".join(f"{a} {b:.3g}" for a, b in rows[k].items()), flush=True)
        diff = {}
        for span in ROUGHNESS_SPANS:
            h = span / s.num_steps
            if float(t[0]) - h / 2 < s.t_end or float(t[0]) + h / 2 > 1.0:
                diff[span] = None
                continue
            fd = (net(x_t, t + h / 2) - net(x_t, t - h / 2)) / h * dt[:, None, None, None]
            diff[span] = float((fd - d_t).norm() / d_t.norm())
        rows[k]["t_part_rel_diff"] = diff
        cos = []
        for j in range(COS_OFFSETS):
            tj = t + 0.5 * j / s.num_steps
            if float(tj[0]) > 1.0:
                break
            _, d_tj = jvp(net, (x_t, tj), (torch.zeros_like(dx), torch.ones_like(dt)))
            cos.append(float(F.cosine_similarity(d_tj.flatten(1), d_t.flatten(1)).mean()))
        rows[k]["t_part_cos"] = cos  # d_t is d eps/dt times dt/dgamma > 0 per image: the same direction
        print(f"k={k}: cos(t part at k, at k + j/2), j = 0..{len(cos) - 1}: " + " ".join(f"{c:.2f}" for c in cos),
              flush=True)
        print(f"k={k}: t part, secant over n timesteps vs exact: "
              + ", ".join(f"n={span:g}: " + ("-" if v is None else f"{v:.2f}") for span, v in diff.items()), flush=True)
    return rows


@torch.no_grad()
def reference(model, out: Path, n: int, seed: int, rk4_steps: int):
    """(noise, RK4 solution, its Richardson error estimate), kept in <out>/reference.pt."""
    path = out / "reference.pt"
    key = {"n": n, "seed": seed, "rk4_steps": rk4_steps}
    if path.exists():
        ref = torch.load(path, weights_only=True)
        if ref["key"] == key:
            return ref["noise"], ref["x"], ref["richardson_rmse"]
    noise = make_noise(n, model.image_shape, seed)
    s = model.schedule
    x = rk4_solve(model, noise.double(), s, 1.0, s.t_end, rk4_steps)
    half = rk4_solve(model, noise.double(), s, 1.0, s.t_end, rk4_steps // 2)
    err = float((x - half).pow(2).mean().sqrt()) / 15
    torch.save({"key": key, "noise": noise, "x": x, "richardson_rmse": err}, path)
    return noise, x, err


@torch.no_grad()
def solver_errors(model, noise, ref, rows, measured_head_error=None, done=None):
    """RMSE against the reference of each row: a solver name, "+ AFS", "genie (exact JVP)",
    "genie_multistep (zero head)" (a head that returns 0 with the default blend weights: what the
    multistep gets from its history alone), or "..., measured head_error" (genie_multistep trusting
    the head by its measured error against the secant target at --span-t, mean over the t bins,
    instead of solvers.DEFAULT_HEAD_ERROR). Rows already in ``done`` (same reference) are kept."""
    out = {row: {int(k): v for k, v in cells.items()} for row, cells in (done or {}).items()}  # JSON keys

    def exact_head(x, t, eps):
        return exact_deps(model, x, t, eps, model.schedule)
    for row in rows:
        if row in out:
            continue
        solver = row.split(" ")[0]
        kw = {"solver": solver, "afs": "+ AFS" in row}
        if row == "genie (exact JVP)":
            kw["head"] = exact_head
        if row == "genie_multistep (zero head)":
            kw["head"] = lambda x, t, eps: torch.zeros_like(eps)
        if row.endswith("measured head_error"):
            kw["head_error"] = measured_head_error
        out[row] = {}
        for nfe in NFES:
            x, spent = genie_fast.sample(model, noise=noise, nfe=nfe, grid="logsnr", **kw)
            rmse = float((x.double() - ref).pow(2).mean().sqrt())
            out[row][nfe] = {"rmse": rmse, "nfe": spent}
            print(f"{row:42s} NFE {nfe:2d}: rmse {rmse:.4f}", flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs_diffusers/fmnist16")
    p.add_argument("--train-minutes", type=float, default=7.0, help="CPU minutes of this process")
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--distill-steps", type=int, default=400)
    p.add_argument("--targets", default="jvp,secant",
                   help="comma-separated heads to distil and compare: jvp, secant (at --span-t), secant:SPAN; "
                        "each optionally @STEPS (e.g. jvp@1600: distil that head for STEPS steps instead of "
                        "--distill-steps, continuing from the longest shorter run of the same target in the list)")
    p.add_argument("--continuous-t", action="store_true",
                   help="train the UNet at genie_fast time t ~ U[1/N, 1], i.e. at fractional timesteps "
                        "tau = N t - 1 with alpha, sigma interpolated as genie_fast's schedule does, instead of "
                        "diffusers' integer timesteps (recorded in train.json; only when the model is trained)")
    p.add_argument("--plain-rows", default="all", choices=("all", "none"),
                   help="'all' or 'none': the solver rows without a head (ddim, dpmpp_2m, ...); 'none' measures "
                        "only the heads' rows")
    p.add_argument("--span-t", type=float, default=0.01,
                   help="the secant target's span in t (0.01: 10 of the 1000 timesteps), for distillation "
                        "and for the head-error column against the secant")
    p.add_argument("--n-eval", type=int, default=64)
    p.add_argument("--rk4-steps", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default="bench/results/diffusers/diffusers_secant.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all, c_all = time.time(), time.process_time()
    results = json.loads(Path(args.results).read_text()) if Path(args.results).exists() else {}
    if not (out / "model" / "unet").exists():
        train(out, args.train_minutes, args.train_batch, args.lr, args.seed, args.continuous_t)
    results["train"] = json.loads((out / "train.json").read_text())
    results["train"].setdefault("timesteps", "integer")  # train.json written before the mode was recorded
    if args.continuous_t and results["train"]["timesteps"] != "continuous":
        raise SystemExit(f"--continuous-t: {out / 'model'} was trained at {results['train']['timesteps']} timesteps")
    heads = [parse_target(spec, args.span_t, args.distill_steps) for spec in args.targets.split(",")]
    results.setdefault("heads", {})
    for name, target, span_t, steps in sorted(heads, key=lambda h: h[3]):  # shorter runs first: longer ones continue them
        info_path = out / f"distill_{name}.json"
        if not (out / "heads" / f"{name}.safetensors").exists():
            start = resume_source(out, heads, name, target, span_t, steps)
            info_path.write_text(json.dumps(distill(out, name, target, span_t, steps, args.threads, start),
                                            indent=2))
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        info["log_tail"] = (out / f"distill_{name}" / "log.txt").read_text().splitlines()[-2]
        results["heads"].setdefault(name, {})["distill"] = info

    model = load_diffusers(out / "model", head=None)
    t0 = time.time()
    spans = sorted({args.span_t} | {span for _, target, span, _ in heads if target == "secant"})
    bins = head_error_bins(model, args.n_eval, args.seed + 1, spans)
    results["target_gap"] = {f"secant_{span:g}": {k: _rel(b[5][f"secant_{span:g}"], b[5]["jvp"])
                                                  for k, b in bins.items()} for span in spans}
    noise, ref, ref_err = reference(model, out, args.n_eval, args.seed + 2, args.rk4_steps)
    results["reference"] = {"rk4_steps": args.rk4_steps, "richardson_rmse": ref_err}
    print(f"reference: RK4 {args.rk4_steps} steps, estimated RMSE {ref_err:.2e}", flush=True)
    results["time_roughness"] = time_roughness(model, 16, args.seed + 3)
    eval_key = {"n_eval": args.n_eval, "seed": args.seed, "rk4_steps": args.rk4_steps, "span_t": args.span_t}
    same = results.get("eval_key") == eval_key  # keep the rows a previous call measured on this reference
    results["eval_key"] = eval_key
    plain = PLAIN_SOLVERS if args.plain_rows == "all" else ()
    results["solvers"] = solver_errors(model, noise, ref, plain, done=results.get("solvers") if same else None)
    for name, *_ in heads:
        hmodel = load_diffusers(out / "model", head=out / "heads" / name)
        err = head_error(hmodel.head, model.schedule, bins)
        measured = float(np.mean(list(err[f"secant_{args.span_t:g}"].values())))
        done = results["heads"][name].get("solvers") if same else None
        results["heads"][name].update(head_rel_err=err, measured_head_error=measured,
                                      solvers=solver_errors(hmodel, noise, ref, HEAD_SOLVERS, measured, done))
    results["eval_wall_s"] = round(time.time() - t0, 1)
    results["machine"] = {"platform": platform.platform(), "processor": platform.processor() or "?",
                          "threads": args.threads, "torch": torch.__version__}
    results["command"] = " ".join(sys.argv)
    results.pop("cpu_s_this_call", None)
    results.setdefault("calls", []).append({"command": results["command"],
                                            "cpu_s": round(time.process_time() - c_all, 1),
                                            "wall_s": round(time.time() - t_all, 1)})
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(results, indent=2) + "\n")

    keys = list(bins)
    print("\n| rel. L2 error, t bin | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for target, row in results["target_gap"].items():
        print(f"| {target} target vs exact JVP | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
    for name, *_ in heads:
        for against, row in results["heads"][name]["head_rel_err"].items():
            print(f"| {name} head vs {against} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
    print("\n| RMSE vs reference | " + " | ".join(str(n) for n in NFES) + " |")
    print("|---|" + "---:|" * len(NFES))
    for row in (row for row in PLAIN_SOLVERS if row in results["solvers"]):
        print(f"| {row} | " + " | ".join(f"{results['solvers'][row][n]['rmse']:.4f}" for n in NFES) + " |")
    for name, *_ in heads:
        for row in HEAD_SOLVERS:
            cells = results["heads"][name]["solvers"][row]
            print(f"| {row}, {name} head | " + " | ".join(f"{cells[n]['rmse']:.4f}" for n in NFES) + " |")
    print(f"\ntotal {time.time() - t_all:.0f}s wall, {time.process_time() - c_all:.0f}s CPU of this process")


if __name__ == "__main__":
    main()
