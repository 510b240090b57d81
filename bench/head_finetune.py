"""Held-out check of a fine-tuned head (issue 27, stage c; the fine-tune is `genie-fast finetune-head`,
genie_fast/training/finetune.py): the median per-sample RMS error against bench_grids' RK4
references on noise seed 2026 (never used to fit anything), for `genie_multistep` on the bundled
model's stored grids (null class NFE 3-10, quadratic at 15; guided s = 2 at its stored budgets) and
`genie` on uniform grids (NFE 5, 10), with the bundled head and each checkpoint's head (and EMA head).

    .venv/bin/python bench/head_finetune.py --nfes 3,4,5,6,8,10,15 --state runs/head_ft/ckpt.pt
    .venv/bin/python bench/head_finetune.py --default --nfes 5,10,15   # sample()'s defaults, null and guided

The first prototype runs (a-d in bench/RESULTS.md) trained with this script's earlier `train`
(git show f9e0c02:bench/head_finetune.py).
"""
from __future__ import annotations

import argparse
import json

import torch

from genie_fast.grid_store import grids_path, load_table
from genie_fast.models import load_default
from genie_fast.schedule import time_grid


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


def evaluate(args):
    """Median per-sample RMS error against the RK4 references of bench_grids' held-out noise (seed
    2026, 32 samples; the reference is the network's alone, so it serves every head): genie_multistep
    on the stored grids and on each fixed grid of --grids (null class; guided s = 2 at the stored
    guided budgets, labels 0..9 in turn), genie on uniform grids (NFE 5, 10)."""
    import genie_fast

    torch.set_num_threads(args.threads)
    model = load_default()
    fixed = [g for g in args.grids.split(",") if g]
    cases = []
    for setting in ("null", "guided"):
        with open(f"bench/results/grids_cond6/{setting}.json") as f:
            ref = torch.tensor(json.load(f)["ref_x0"])
        scale = None if setting == "null" else 2.0
        grids = stored_grids(model, guidance_scale=scale)
        labels = None if scale is None else torch.arange(len(ref)) % model.num_classes
        for nfe in map(int, args.nfes.split(",")) if scale is None else sorted(k for k in grids if k >= 4):
            cases.append((setting, "genie_multistep", nfe, "stored" if nfe in grids else "quadratic",
                          grid_for(model, grids, nfe), labels, scale, ref))
            cases += [(setting, "genie_multistep", nfe, g, g, labels, scale, ref) for g in fixed]
        if scale is None:
            for nfe in (5, 10):
                cases.append((setting, "genie", nfe, "uniform", "uniform", None, None, ref))
    noise = torch.randn(32, *model.image_shape, generator=torch.Generator().manual_seed(2026))
    heads = {} if args.no_bundled else {"bundled": None}
    for p in args.state or []:
        st = torch.load(p)
        heads[p] = st["head"]
        if "ema" in st or "ema_head" in st:
            heads[p + ":ema"] = st.get("ema", st.get("ema_head"))
    base = {k: v.clone() for k, v in model.head.state_dict().items()}
    res = {}
    for name, sd in heads.items():
        model.head.load_state_dict(base if sd is None else sd)
        model.__dict__.pop("_genie_weights_ids", None)
        row = {}
        for setting, solver, nfe, gname, ts, labels, scale, ref in cases:
            kw = {"head_error": args.head_error} if args.head_error is not None and solver == "genie_multistep" else {}
            if isinstance(ts, str):  # a fixed grid: sample() picks its steps for this budget
                x0, _ = genie_fast.sample(model, noise=noise, solver=solver, nfe=nfe, grid=ts, afs=True,
                                          labels=labels, guidance_scale=scale, **kw)
            else:
                x0, _ = genie_fast.sample(model, noise=noise, solver=solver, grid=ts, afs=True, labels=labels,
                                          guidance_scale=scale, **kw)
            row[f"{setting} {solver} {nfe} {gname}"] = float((x0 - ref).pow(2).flatten(1).mean(1).sqrt().median())
        res[name] = row
        print(name, "; ".join(f"{k}: {v:.4f}" for k, v in row.items()), flush=True)
    return res


def default_rows(args):
    """The bundled model's default sampling (`sample()` with no grid: its stored tuned grid, else the fixed
    auto grid) on the same held-out noise and references: null class and guided (s = 2) at --nfes."""
    import genie_fast

    torch.set_num_threads(args.threads)
    model = load_default()
    noise = torch.randn(32, *model.image_shape, generator=torch.Generator().manual_seed(2026))
    res = {}
    for setting, scale in (("null", None), ("guided", 2.0)):
        with open(f"bench/results/grids_cond6/{setting}.json") as f:
            ref = torch.tensor(json.load(f)["ref_x0"])
        labels = None if scale is None else torch.arange(len(ref)) % model.num_classes
        for nfe in map(int, args.nfes.split(",")):
            x0, spent = genie_fast.sample(model, noise=noise, nfe=nfe, labels=labels, guidance_scale=scale)
            res[f"{setting} default {nfe} ({spent} run)"] = float((x0 - ref).pow(2).flatten(1).mean(1).sqrt().median())
    print("; ".join(f"{k}: {v:.4f}" for k, v in res.items()), flush=True)
    return {"default": res}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nfes", default="3,4,5,6,8,10,15", help="null-class budgets of genie_multistep")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--state", nargs="*", default=None, help="checkpoints (finetune-head's ckpt.pt)")
    p.add_argument("--head-error", type=float, default=None, help="genie_multistep's blend value (default: the model's)")
    p.add_argument("--json", default=None, help="write the table here")
    p.add_argument("--grids", default="", help="fixed grids to run too, e.g. uniform,quadratic,logsnr,edm")
    p.add_argument("--no-bundled", action="store_true", help="only the checkpoints' heads")
    p.add_argument("--default", action="store_true", help="only the bundled model's default sampling at --nfes")
    args = p.parse_args()
    res = default_rows(args) if args.default else evaluate(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
