"""A diffusers UNet2DModel trained here, its distilled GENIE head, and GENIE vs DDIM vs DPM-Solver++.

    python bench/bench_diffusers.py --out runs_diffusers/fmnist16 --train-minutes 7 --distill-steps 300

Phases (each skipped when its output exists, so a rerun only evaluates):
1. train a small UNet2DModel (16x16 Fashion-MNIST: the padded 32x32 images average-pooled 2x2;
   channels (32, 64), attention at 8x8, 1000-step linear DDPM betas, epsilon prediction) for
   --train-minutes of wall time, EMA weights saved with save_pretrained as a pipeline folder;
2. distil its GENIE head with the command line a user runs:
   ``genie-fast distill --diffusers <out>/model --data <out>/train16.npz --steps N``;
3. measure on held-out data: the head's relative L2 error against the exact JVP (d eps / d gamma)
   per t bin, and the sampling error of ddim / dpmpp_2m / genie (learned head) / genie with the
   exact JVP at NFE 5-20 against a float64-state RK4 reference of the same ODE (--rk4-steps steps
   uniform in log gamma; logSNR grids for the solvers, t from 1 to 1/N), as RMSE over pixels and
   samples in [-1, 1] units; and the size of the time derivative's roughness (the exact d eps / dt
   part of the JVP against a 10-step secant) at a few timesteps.
Writes bench/results/diffusers.json and prints the tables for bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import genie_fast
from genie_fast.data import load_fashion_mnist
from genie_fast.distill import head_loss
from genie_fast.models.diffusers import load_diffusers
from genie_fast.reference import rk4_solve
from genie_fast.sampling import make_noise
from genie_fast.solvers import exact_deps

NFES = (5, 8, 10, 15, 20)
SOLVERS = ("ddim", "dpmpp_2m", "genie", "genie + AFS", "genie (exact JVP)")


def fmnist16(split):
    x, y = load_fashion_mnist(split)
    return F.avg_pool2d(x, 2), y


def train(out: Path, minutes: float, batch: int, lr: float, seed: int):
    import diffusers

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
    t0, step, losses = time.time(), 0, []
    while time.time() - t0 < 60 * minutes:
        idx = torch.randint(len(x), (batch,), generator=gen)
        x0 = x[idx]
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
    info = {"steps": step, "batch": batch, "lr": lr, "wall_s": round(time.time() - t0, 1),
            "final_loss_100": float(np.mean(losses[-100:])), "params": sum(p.numel() for p in unet.parameters())}
    (out / "train.json").write_text(json.dumps(info, indent=2))
    return info


def distill(out: Path, steps: int, threads: int):
    x, _ = fmnist16("train")
    u8 = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez(out / "train16.npz", arr_0=u8)
    cmd = [sys.executable, "-m", "genie_fast.cli", "distill", "--diffusers", str(out / "model"),
           "--out", str(out / "distill"), "--data", str(out / "train16.npz"), "--steps", str(steps),
           "--batch", "32", "--threads", str(threads), "--log-every", "25", "--lr", "1e-3", "--warmup", "50"]
    if (out / "distill" / "ckpt.pt").exists():
        cmd.append("--resume")
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    return {"steps": steps, "wall_s": round(time.time() - t0, 1), "command": " ".join(cmd[1:])}


@torch.no_grad()
def head_error(model, n: int, seed: int):
    """Relative L2 error of the head's d eps / d gamma against the exact JVP, per t bin, on
    x_t = alpha x0 + sigma z from test images."""
    x, _ = fmnist16("test")
    gen = torch.Generator().manual_seed(seed)
    x0 = x[torch.randint(len(x), (n,), generator=gen)]
    rows = {}
    edges = (1e-3, 0.1, 0.3, 0.6, 1.0)
    for lo, hi in zip(edges[:-1], edges[1:]):
        t = lo + (hi - lo) * torch.rand(n, generator=gen)
        a, s = model.schedule.alpha(t)[:, None, None, None], model.schedule.sigma(t)[:, None, None, None]
        x_t = a * x0 + s * torch.randn(x0.shape, generator=gen)
        _, rel = head_loss(model, x_t, t)
        rows[f"{lo:g}-{hi:g}"] = float(rel)
    return rows


@torch.no_grad()
def time_roughness(model, n: int, seed: int):
    """Norms of the two parts of the JVP target at x_t from test images, at timesteps k: the x part
    (J_x eps . dx/dgamma), the exact t part (d eps/dt . dt/dgamma) and the same t part from a secant
    over 10 timesteps. A network trained at integer timesteps only may wiggle between them; the
    exact t derivative then carries the wiggle, the secant does not."""
    from genie_fast.distill import ode_tangents
    from genie_fast.solvers import jvp

    x, _ = fmnist16("test")
    gen = torch.Generator().manual_seed(seed)
    x0 = x[torch.randint(len(x), (n,), generator=gen)]
    s, net, rows = model.schedule, model.unet, {}
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
    return rows


@torch.no_grad()
def solver_errors(model, n: int, seed: int, rk4_steps: int):
    """RMSE of each solver against RK4 (uniform in log gamma) with rk4_steps steps; the RK4 error
    is estimated from the run with half the steps (Richardson, |x_2N - x_N| / 15, as RMSE)."""
    noise = make_noise(n, model.image_shape, seed)
    s = model.schedule
    ref = rk4_solve(model, noise.double(), s, 1.0, s.t_end, rk4_steps)
    half = rk4_solve(model, noise.double(), s, 1.0, s.t_end, rk4_steps // 2)
    ref_err = float((ref - half).pow(2).mean().sqrt()) / 15
    out = {"reference": {"rk4_steps": rk4_steps, "richardson_rmse": ref_err}}
    print(f"reference: RK4 {rk4_steps} steps, estimated RMSE {ref_err:.2e}", flush=True)

    def exact_head(x, t, eps):
        return exact_deps(model, x, t, eps, model.schedule)
    for solver in SOLVERS:
        out[solver] = {}
        for nfe in NFES:
            kw = {"solver": "genie", "head": exact_head} if solver == "genie (exact JVP)" else \
                {"solver": "genie", "afs": True} if solver == "genie + AFS" else {"solver": solver}
            x, spent = genie_fast.sample(model, noise=noise, nfe=nfe, grid="logsnr", **{"afs": False, **kw})
            rmse = float((x.double() - ref).pow(2).mean().sqrt())
            out[solver][nfe] = {"rmse": rmse, "nfe": spent}
            print(f"{solver:18s} NFE {nfe:2d}: rmse {rmse:.4f}", flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs_diffusers/fmnist16")
    p.add_argument("--train-minutes", type=float, default=7.0)
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--distill-steps", type=int, default=300)
    p.add_argument("--n-eval", type=int, default=64)
    p.add_argument("--rk4-steps", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default="bench/results/diffusers.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    results = json.loads(Path(args.results).read_text()) if Path(args.results).exists() else {}
    if not (out / "model" / "unet").exists():
        train(out, args.train_minutes, args.train_batch, args.lr, args.seed)
    results["train"] = json.loads((out / "train.json").read_text())
    if not (out / "model" / "genie_head.safetensors").exists():
        (out / "distill.json").write_text(json.dumps(distill(out, args.distill_steps, args.threads), indent=2))
    results["distill"] = json.loads((out / "distill.json").read_text()) if (out / "distill.json").exists() else {}
    results["distill"]["log_tail"] = (out / "distill" / "log.txt").read_text().splitlines()[-2]
    model = load_diffusers(out / "model")
    t0 = time.time()
    results["head_rel_err"] = head_error(model, args.n_eval, args.seed + 1)
    results["time_roughness"] = time_roughness(model, 16, args.seed + 3)
    results["solvers"] = solver_errors(model, args.n_eval, args.seed + 2, args.rk4_steps)
    results["eval_wall_s"] = round(time.time() - t0, 1)
    results["machine"] = {"platform": platform.platform(), "processor": platform.processor() or "?",
                          "threads": args.threads, "torch": torch.__version__}
    results["command"] = " ".join(sys.argv)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(results, indent=2) + "\n")

    print("\n| head rel. L2 error vs exact JVP | " + " | ".join(results["head_rel_err"]) + " |")
    print("|---|" + "---:|" * len(results["head_rel_err"]))
    print("| t bin | " + " | ".join(f"{v:.3f}" for v in results["head_rel_err"].values()) + " |")
    print("\n| RMSE vs reference | " + " | ".join(str(n) for n in NFES) + " |")
    print("|---|" + "---:|" * len(NFES))
    for solver in SOLVERS:
        print(f"| {solver} | " + " | ".join(f"{results['solvers'][solver][n]['rmse']:.4f}" for n in NFES) + " |")
    print(f"\ntotal {time.time() - t_all:.0f}s")


if __name__ == "__main__":
    main()
