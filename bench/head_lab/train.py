"""Train one head candidate on the cached targets at a fixed step budget; evaluate on held-out sets.

    ulimit -v 12000000; nice -n 10 .venv/bin/python bench/head_lab/train.py mr_s --steps 1200 --resume
    options: --data-frac 0.5 (first half of the train cache), --tag NAME (result/ckpt suffix)
             --eval-only (0 steps: evaluates the initial head, e.g. the bundled one)

Adam lr 1e-3, 100-step linear warm-up then cosine to 0 over --steps, batch 64, loss = mean over the
batch of sum gamma^2 |head_combine_ref(out, gamma) - target|^2. Checkpoints (head, opt, step, log)
to runs/head_lab/ckpt/<name><tag>.pt at every evaluation and at least every 4 minutes; the final
head state_dict to runs/head_lab/heads/<name><tag>.pt; the log to bench/results/head_lab/<name><tag>.json.
Evaluation: pooled gamma-weighted relative L2 (bench_quality.head_fidelity's measure) on the
forward-process test cache (8 t-bins, null vs labelled, low/high spatial frequency of the residual)
and on the trajectory cache.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heads import build  # noqa: E402
from cache import CACHE, EXTRA, ROOT  # noqa: E402
from genie_fast.ops import head_combine_ref  # noqa: E402
from genie_fast.schedule import VPSchedule  # noqa: E402

SCHED = VPSchedule()  # the bundled model's schedule (checked against load_default in cache.py runs)
KEYS = ("x_t", "eps", "target", "temb", "f32", "f16", "f8", "mid", "t", "label")
RES = ROOT / "bench" / "results" / "head_lab"
CK = ROOT / "runs" / "head_lab" / "ckpt"
HEADS = ROOT / "runs" / "head_lab" / "heads"


def load_split(split, frac=1.0, extra=False):
    files = sorted(glob.glob(str(CACHE / f"{split}_[0-9]*.pt")), key=lambda p: int(Path(p).stem.split("_")[1]))
    files = [f for f in files if not f.endswith("_extra.pt")]
    if not files:
        raise FileNotFoundError(f"no {split} cache in {CACHE}")
    parts = [torch.load(f) for f in files]
    if extra:
        for f, q in zip(files, parts):
            q.update(torch.load(f[:-3] + "_extra.pt"))
    d = {k: torch.cat([p[k] for p in parts]) for k in (*KEYS, *(EXTRA if extra else ()))}
    if frac < 1.0:
        n = int(len(d["t"]) * frac)
        d = {k: v[:n] for k, v in d.items()}
    return d


def batch_of(d, idx):
    return {k: (v[idx].float() if v.dtype == torch.float16 else v[idx]) for k, v in d.items()}


def deps_of(head, b):
    gam = SCHED.gamma(b["t"])[:, None, None, None]
    return head_combine_ref(head(b), gam), gam


@torch.no_grad()
def evaluate(head, d, bins=8, bs=128):
    head.eval()
    n = len(d["t"])
    nums, dens, lows, tlows = [], [], [], []
    for i in range(0, n, bs):
        b = batch_of(d, slice(i, i + bs))
        pred, gam = deps_of(head, b)
        r = gam * (pred - b["target"])
        nums.append(r.square().flatten(1).sum(1))
        dens.append((gam * b["target"]).square().flatten(1).sum(1))
        # low-frequency part of the residual: 4x4 average pool, upsampled back (energy per pixel)
        lo = F.interpolate(F.avg_pool2d(r, 4), scale_factor=4.0, mode="nearest")
        lows.append(lo.square().flatten(1).sum(1))
        tg = gam * b["target"]
        tlows.append(F.interpolate(F.avg_pool2d(tg, 4), scale_factor=4.0, mode="nearest").square().flatten(1).sum(1))
    head.train()
    num, den, low = torch.cat(nums), torch.cat(dens), torch.cat(lows)
    t, lab = d["t"], d["label"]
    out = {"pooled": math.sqrt(num.sum() / den.sum()),
           "pooled_low4": math.sqrt(low.sum() / den.sum()),
           "pooled_high4": math.sqrt((num - low).sum() / den.sum()),
           "target_low4_energy_frac": float(torch.cat(tlows).sum() / den.sum())}
    null = lab == 10
    out["pooled_null"] = math.sqrt(num[null].sum() / den[null].sum())
    out["pooled_labelled"] = math.sqrt(num[~null].sum() / den[~null].sum())
    edges = torch.linspace(SCHED.t_end, 1.0, bins + 1)
    rows = []
    for lo_, hi_ in zip(edges[:-1], edges[1:]):
        m = (t >= lo_) & (t <= hi_) if hi_ == edges[-1] else (t >= lo_) & (t < hi_)
        if m.sum() == 0:
            continue
        rows.append({"t_lo": float(lo_), "t_hi": float(hi_), "n": int(m.sum()),
                     "pooled": math.sqrt(num[m].sum() / den[m].sum()),
                     "share_of_err": float(num[m].sum() / num.sum())})
    out["per_t_bin"] = rows
    return out


def lr_at(step, total, base, warm=100):
    if step < warm:
        return base * (step + 1) / warm
    return base * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=300)
    p.add_argument("--data-frac", type=float, default=1.0)
    p.add_argument("--tag", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--eval-only", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    for q in (RES, CK, HEADS):
        q.mkdir(parents=True, exist_ok=True)
    run = a.name + a.tag
    torch.manual_seed(a.seed)
    head = build(a.name)
    ex = getattr(head, "needs_extra", False)
    test, traj = load_split("test", extra=ex), load_split("traj", extra=ex)
    n_params = sum(q.numel() for q in head.parameters())
    log = {"name": a.name, "tag": a.tag, "params": n_params, "steps": a.steps, "batch": a.batch, "lr": a.lr,
           "data_frac": a.data_frac, "loss_curve": [], "evals": []}
    if a.eval_only:
        log["steps"] = 0
        log["evals"].append({"step": 0, "test": evaluate(head, test), "traj": evaluate(head, traj)})
        (RES / f"{run}.json").write_text(json.dumps(log, indent=1))
        print(json.dumps({k: log["evals"][0][k]["pooled"] for k in ("test", "traj")}))
        return
    train = load_split("train", a.data_frac, extra=ex)
    n_train = len(train["t"])
    log["n_train"] = n_train
    opt = torch.optim.Adam(head.parameters(), lr=a.lr)
    step, wall = 0, 0.0
    ck = CK / f"{run}.pt"
    g = torch.Generator().manual_seed(a.seed)
    if a.resume and ck.exists():
        st = torch.load(ck)
        head.load_state_dict(st["head"]), opt.load_state_dict(st["opt"])
        step, wall, log, g_state = st["step"], st["wall"], st["log"], st["gen"]
        g.set_state(g_state)
        print(f"resumed {run} at step {step}", flush=True)

    def save():
        torch.save({"head": head.state_dict(), "opt": opt.state_dict(), "step": step, "wall": wall, "log": log,
                    "gen": g.get_state()}, ck.with_suffix(".tmp"))
        ck.with_suffix(".tmp").rename(ck)
        (RES / f"{run}.json").write_text(json.dumps(log, indent=1))

    if step == 0 and not log["evals"]:
        log["evals"].append({"step": 0, "test": evaluate(head, test), "traj": evaluate(head, traj)})
    t_last_save, t0 = time.time(), time.time() - wall
    acc_num = acc_den = acc_loss = 0.0
    acc_n = 0
    while step < a.steps:
        idx = torch.randint(0, n_train, (a.batch,), generator=g)
        b = batch_of(train, idx)
        pred, gam = deps_of(head, b)
        r = gam * (pred - b["target"])
        loss = r.square().flatten(1).sum(1).mean()
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, a.steps, a.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        acc_loss += float(loss)
        acc_num += float(r.square().sum())
        acc_den += float((gam * b["target"]).square().sum())
        acc_n += 1
        if step % 50 == 0:
            wall = time.time() - t0
            log["loss_curve"].append({"step": step, "loss": acc_loss / acc_n, "train_rel": math.sqrt(acc_num / acc_den),
                                      "wall_s": wall})
            print(f"{run} step {step} loss {acc_loss / acc_n:.4f} train_rel {math.sqrt(acc_num / acc_den):.3f} "
                  f"{wall:.0f}s ({wall / step:.3f} s/step)", flush=True)
            acc_num = acc_den = acc_loss = 0.0
            acc_n = 0
        if step % a.eval_every == 0 or step == a.steps:
            e = {"step": step, "test": evaluate(head, test), "traj": evaluate(head, traj)}
            log["evals"].append(e)
            print(f"  eval {step}: test {e['test']['pooled']:.4f} traj {e['traj']['pooled']:.4f}", flush=True)
            wall = time.time() - t0
            save()
            t_last_save = time.time()
        elif time.time() - t_last_save > 240:
            wall = time.time() - t0
            save()
            t_last_save = time.time()
    log["wall_s"] = time.time() - t0
    save()
    torch.save(head.state_dict(), HEADS / f"{run}.pt")
    print(f"done {run}: test {log['evals'][-1]['test']['pooled']:.4f} traj {log['evals'][-1]['traj']['pooled']:.4f}")


if __name__ == "__main__":
    main()
