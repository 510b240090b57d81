"""Solver-aware fine-tuning of the bundled head (issue 27, stage c): the network frozen, the head
trained so that `genie_multistep` at a few steps lands on a high-accuracy teacher's end point from
the same noise (AMED-Plugin / LD3-style: the loss is the sample's error, back-propagated through the
solver's own loop, `backend="torch"`, and through the network to the head's earlier outputs).

    L="ulimit -v 12000000; nice -n 5 .venv/bin/python"
    $L bench/head_finetune.py teacher                 # training noises + RK4 end points (cached)
    $L bench/head_finetune.py train --iters 400       # resumable (state every 10 iterations)
    $L bench/head_finetune.py eval [--state PATH]     # held-out noise (bench/results/grids_cond6/null.json)

Training noise: seed 11 (never used elsewhere), half null class, half random labels unguided.
Grids: the bundled model's stored (tuned) grid per NFE, read once from its grids file.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_quality import rk4_reference  # noqa: E402

from genie_fast.grid_store import grids_path, load_table  # noqa: E402
from genie_fast.guidance import conditioned  # noqa: E402
from genie_fast.models import load_default  # noqa: E402
from genie_fast.solvers.genie_multistep import genie_multistep  # noqa: E402
from genie_fast.solvers.taylor import genie  # noqa: E402
from genie_fast.schedule import time_grid  # noqa: E402

OUT = "runs/head_ft"


def stored_grids(model, solver="genie_multistep", guidance_scale=None):
    """NFE -> decreasing float64 times of the model's stored grid for this setting (AFS on)."""
    table = load_table(grids_path(model))
    out = {}
    for rec in table.to_json()["grids"]:
        if rec["solver"] == solver and rec["guidance_scale"] == guidance_scale and rec["afs"] and not rec["denoise"]:
            out[rec["nfe"]] = torch.tensor(rec["times"], dtype=torch.float64)
    return out


def grid_for(model, grids, nfe):
    if nfe in grids:
        return grids[nfe]
    return time_grid(model.schedule, nfe + 1, "quadratic")  # AFS: nfe + 1 steps for nfe NFE


def teacher(args):
    model = load_default()
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(args.n, *model.image_shape, generator=g)
    labels = torch.randint(0, model.num_classes, (args.n,), generator=g)
    labels[: args.n // 2] = model.num_classes  # the null class
    path = f"{OUT}/teacher.pt"
    os.makedirs(OUT, exist_ok=True)
    old = torch.load(path) if os.path.exists(path) else {"ref": []}
    refs = list(old["ref"])
    bs = 32
    t0 = time.time()
    for i in range(len(refs) * bs, args.n, bs):
        fn = conditioned(model, labels[i:i + bs], 1.0, batch=len(labels[i:i + bs]))
        with torch.no_grad():
            refs.append(rk4_reference(fn, model.schedule, noise[i:i + bs], args.steps))
        torch.save({"noise": noise, "labels": labels, "ref": refs, "steps": args.steps}, path)
        print(f"teacher {i + bs}/{args.n} {time.time() - t0:.0f}s", flush=True)
    if args.check:
        fn = conditioned(model, labels[:8], 1.0, batch=8)
        with torch.no_grad():
            fine = rk4_reference(fn, model.schedule, noise[:8], 4 * args.steps)
        err = (torch.cat(refs)[:8] - fine).pow(2).flatten(1).mean(1).sqrt()
        print("teacher vs 4x steps, per-sample RMS:", [f"{e:.2e}" for e in err.tolist()])


def run(model, fn, x, ts, head_error, solver="genie_multistep"):
    if solver == "genie":
        out, _ = genie(fn, x, ts, model.schedule, afs=True, backend="torch")
    else:
        out, _ = genie_multistep(fn, x, ts, model.schedule, afs=True, backend="torch", head_error=head_error)
    return out


# the bundled head's held-out median error per budget (eval above): the loss divides by it, so each
# budget's relative error counts the same
SCALE = {("genie_multistep", 5): 0.0609, ("genie_multistep", 6): 0.0461, ("genie_multistep", 8): 0.0223,
         ("genie_multistep", 10): 0.0178, ("genie_multistep", 15): 0.0106, ("genie", 5): 0.0976,
         ("genie", 10): 0.0463}


def train(args):
    torch.set_num_threads(args.threads)
    model = load_default()
    head_error = model.head_error
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.head.parameters())
    for p in params:
        p.requires_grad_(True)
    data = torch.load(f"{OUT}/teacher.pt")
    noise, labels, ref = data["noise"], data["labels"], torch.cat(data["ref"])
    n = len(ref)
    grids = stored_grids(model)
    nfes = [int(v) for v in args.nfes.split(",")]
    opt = torch.optim.Adam(params, lr=args.lr)
    state_path = args.state or f"{OUT}/state.pt"
    step, log = 0, []
    ema = {k: v.detach().clone() for k, v in model.head.state_dict().items()}
    if os.path.exists(state_path):
        st = torch.load(state_path)
        model.head.load_state_dict(st["head"])
        opt.load_state_dict(st["opt"])
        step, log, ema = st["step"], st["log"], st.get("ema", ema)
        print(f"resumed at {step}", flush=True)
    gen = torch.Generator().manual_seed(1234 + step)
    t0 = time.time()
    while step < args.iters:
        idx = torch.randperm(n, generator=gen)[: args.batch]
        nfe = nfes[int(torch.randint(len(nfes), (1,), generator=gen))]
        solver = "genie" if float(torch.rand((), generator=gen)) < args.genie_share else "genie_multistep"
        if solver == "genie":
            nfe = (5, 10)[int(torch.randint(2, (1,), generator=gen))]
        lab = labels[idx]
        fn = conditioned(model, lab, 1.0, batch=len(idx))
        ts = grid_for(model, grids, nfe) if solver == "genie_multistep" else \
            time_grid(model.schedule, nfe + 1, "uniform")
        with torch.enable_grad():
            x0 = run(model, fn, noise[idx], ts, head_error, solver)
            per = (x0 - ref[idx]).pow(2).flatten(1).mean(1)
            loss = per.sqrt().mean() if args.loss == "rms" else per.mean()
            if args.norm:
                loss = loss / SCALE[(solver, nfe)]
        opt.zero_grad()
        loss.backward()
        warm = min(1.0, (step + 1) / 20)
        decay = 0.5 * (1 + math.cos(math.pi * step / args.iters)) if args.cosine else 1.0
        for group in opt.param_groups:
            group["lr"] = args.lr * warm * decay
        opt.step()
        with torch.no_grad():
            for k, v in model.head.state_dict().items():
                ema[k].mul_(args.ema).add_(v, alpha=1 - args.ema)
        step += 1
        log.append((step, nfe, float(per.detach().sqrt().median()), solver))
        if step % 10 == 0 or step == args.iters:
            recent = [r[2] for r in log[-10:]]
            print(f"step {step} nfe {nfe} median-rms(last10) {sum(recent) / len(recent):.4f} "
                  f"{time.time() - t0:.0f}s", flush=True)
            tmp = state_path + ".tmp"
            torch.save({"head": model.head.state_dict(), "ema": ema, "opt": opt.state_dict(), "step": step,
                        "log": log, "args": vars(args)}, tmp)
            os.replace(tmp, state_path)


def evaluate(args):
    """Median per-sample RMS error against the RK4 references of bench_grids' held-out noise (seed
    2026, 32 samples): genie_multistep on the stored grids (null and guided s = 2), genie on uniform."""
    import genie_fast

    torch.set_num_threads(args.threads)
    model = load_default()
    cases = []
    for setting in ("null", "guided"):
        with open(f"bench/results/grids_cond6/{setting}.json") as f:
            ref = torch.tensor(json.load(f)["ref_x0"])
        scale = None if setting == "null" else 2.0
        grids = stored_grids(model, guidance_scale=scale)
        labels = None if scale is None else torch.arange(len(ref)) % model.num_classes
        for nfe in map(int, args.nfes.split(",")) if scale is None else sorted(k for k in grids if k >= 4):
            cases.append((setting, "genie_multistep", nfe, grid_for(model, grids, nfe), labels, scale, ref))
        if scale is None:
            for nfe in (5, 10):
                cases.append((setting, "genie", nfe, time_grid(model.schedule, nfe + 1, "uniform"), None, None, ref))
    noise = torch.randn(32, *model.image_shape, generator=torch.Generator().manual_seed(2026))
    heads = {"bundled": None}
    for p in args.state or []:
        st = torch.load(p)
        heads[p] = st["head"]
        if "ema" in st:
            heads[p + ":ema"] = st["ema"]
    base = {k: v.clone() for k, v in model.head.state_dict().items()}
    res = {}
    for name, sd in heads.items():
        model.head.load_state_dict(base if sd is None else sd)
        model.__dict__.pop("_genie_weights_ids", None)
        row = {}
        for setting, solver, nfe, ts, labels, scale, ref in cases:
            x0, _ = genie_fast.sample(model, noise=noise, solver=solver, grid=ts, afs=True, labels=labels,
                                      guidance_scale=scale, **({"head_error": args.head_error}
                                                               if args.head_error is not None and solver == "genie_multistep" else {}))
            row[f"{setting} {solver} {nfe}"] = float((x0 - ref).pow(2).flatten(1).mean(1).sqrt().median())
        res[name] = row
        print(name, "; ".join(f"{k}: {v:.4f}" for k, v in row.items()), flush=True)
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["teacher", "train", "eval"])
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--steps", type=int, default=25, help="teacher RK4 steps")
    p.add_argument("--check", action="store_true")
    p.add_argument("--iters", type=int, default=400)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--nfes", default="5,6,8,10")
    p.add_argument("--loss", choices=["rms", "mse"], default="rms")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument("--cosine", action="store_true")
    p.add_argument("--norm", action="store_true", help="divide each budget's loss by the bundled head's error")
    p.add_argument("--genie-share", type=float, default=0.0, help="share of iterations that run genie")
    p.add_argument("--state", nargs="*", default=None)
    p.add_argument("--head-error", type=float, default=None, help="eval: genie_multistep's blend value")
    args = p.parse_args()
    if args.what == "train" and args.state:
        args.state = args.state[0]
    {"teacher": teacher, "train": train, "eval": evaluate}[args.what](args)


if __name__ == "__main__":
    main()
