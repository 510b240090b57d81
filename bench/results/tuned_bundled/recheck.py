"""Re-check the bundled model's stored grids of the head solvers for a new head (issue 27: the head
fine-tuned by `genie-fast finetune-head`): a grid tuned with the old head is no longer known to be
the best for the new one, and the grids file refuses it for other weights.

For each stored genie_multistep key, the solver with the new head runs that key's stored grid and
every fixed grid of the same steps (and AFS) on selection noise, and the lowest median error is kept
under the new weights' id; the head-free solvers' grids (recorded under the network's id) are kept as
they are. Selection noise, never the held-out noise: null class, the fine-tune's own teacher
(runs/head_ft_e/teacher.pt: seed 11, its first 64 samples, all null class, RK4 50 steps); guided
(s = 2, labels 0..9 in turn), 32 noises of seed 12 against RK4 50 steps of the guided ODE, computed
here. Each kept grid also gets its held-out error (bench_grids' seed-2026 noise and RK4 references)
and that of the best fixed grid there.

    PYTHONPATH=. python bench/results/tuned_bundled/recheck.py genie_fast/assets/fmnist_genie.grids.json \
        runs/ft_e/fmnist_genie --json bench/results/tuned_bundled/recheck.json
(writes runs/ft_e/fmnist_genie.grids.json, the new model's grids file)
"""
import argparse
import json
from pathlib import Path

import torch

import genie_fast
from genie_fast.grid_store import GridTable, _ids, _needed_id, load_table
from genie_fast.guidance import conditioned
from genie_fast.models import load_model
from genie_fast.reference import rk4_solve
from genie_fast.schedule import GRIDS, time_grid
from genie_fast.solvers import HEAD_SOLVERS
from genie_fast.training.finetune import training_noise

ROOT = Path(__file__).resolve().parents[3]


def median_error(x0, ref):
    return float((x0 - ref).pow(2).flatten(1).mean(1).sqrt().median())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old", help="the grids file tuned with the old head")
    p.add_argument("stem", help="the model with the new head (its grids file is written)")
    p.add_argument("--teacher", default="runs/head_ft_e/teacher.pt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    old = load_table(args.old)
    model = load_model(args.stem)
    sch = model.schedule
    noise, labels = training_noise(model, 256, 11, "mix")
    sel = {None: (noise[:64], None, torch.cat(torch.load(args.teacher, weights_only=True)["x0"])[:64])}
    assert labels is not None and bool((labels[:64] == model.num_classes).all())
    g_noise = torch.randn(32, *model.image_shape, generator=torch.Generator().manual_seed(12))
    g_labels = torch.arange(32) % model.num_classes
    fn = conditioned(model, g_labels, 2.0, batch=32)
    with torch.no_grad():
        g_ref = rk4_solve(lambda x, t: fn(x.float(), t.float()), g_noise, sch, 1.0, sch.t_end, 50).float()
    sel[2.0] = (g_noise, g_labels, g_ref)
    held = {}
    for scale, name in ((None, "null"), (2.0, "guided")):
        with open(ROOT / f"bench/results/grids_cond6/{name}.json") as f:
            ref = torch.tensor(json.load(f)["ref_x0"])
        lab = None if scale is None else torch.arange(len(ref)) % model.num_classes
        held[scale] = (torch.randn(len(ref), *model.image_shape, generator=torch.Generator().manual_seed(2026)), lab, ref)

    kept, rows = [], []
    for rec in old.records.values():
        if rec["solver"] not in HEAD_SOLVERS:
            kept.append(rec)
            continue
        scale, steps, afs = rec["guidance_scale"], rec["steps"], rec["afs"]
        cands = {"stored": torch.tensor(rec["times"], dtype=torch.float64)}
        cands.update({g: time_grid(sch, steps, g) for g in GRIDS})
        errs = {}
        for split, (z, lab, ref) in (("selection", sel[scale]), ("held_out", held[scale])):
            for g, ts in cands.items():
                x0, _ = genie_fast.sample(model, noise=z, solver=rec["solver"], grid=ts, afs=afs, labels=lab,
                                          guidance_scale=scale)
                errs[(split, g)] = median_error(x0, ref)
        best = min(cands, key=lambda g: errs[("selection", g)])
        best_fixed = min(GRIDS, key=lambda g: errs[("held_out", g)])
        row = {"solver": rec["solver"], "steps": steps, "nfe": rec["nfe"], "guidance_scale": scale, "kept": best,
               "selection": {g: errs[("selection", g)] for g in cands},
               "held_out": {g: errs[("held_out", g)] for g in cands}}
        rows.append(row)
        print(json.dumps(row), flush=True)
        new = {k: rec[k] for k in ("solver", "steps", "nfe", "afs", "denoise", "guidance_scale")}
        new["times"] = [float(t) for t in cands[best]]
        new["tuned"] = {"method": "recheck", "kept": best, "for": "a new head (genie-fast finetune-head)",
                        "selection": row["selection"], "selection_noise": "seed 11 null (64) / seed 12 guided (32)",
                        "stored_grid_was": rec.get("tuned")}
        new["held_out"] = {"median": errs[("held_out", best)], "best_fixed_grid": best_fixed,
                           "best_fixed_median": errs[("held_out", best_fixed)], "noise_seed": 2026, "n": 32,
                           "reference": "rk4 100 steps"}
        new["weights"] = _needed_id(model, rec["solver"])
        kept.append(new)
    out = Path(str(args.stem) + ".grids.json")
    table = GridTable(out, _ids(model)[0], kept)
    out.write_text(json.dumps(table.to_json(), indent=1) + "\n")
    print(f"wrote {out}: {table.describe()}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
