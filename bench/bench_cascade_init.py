"""Does the cascade's upsampler (config ``fmnist_sr``) train faster from the bundled 32x32 model's
weights (its new low-resolution input channels and augmentation embedding at zero,
`training.cascade.init_low_res_from`) than from a fresh initialisation? And the 16x16 base model
(``--stage base``, config ``fmnist16_cond``: the same weight shapes, so the bundled weights load as
they are)? (issue 32)

Two `genie-fast train --config fmnist_sr` runs with the same seed, data order and settings, one
with ``--init-model`` (the bundled model), for ``--steps`` steps; the live weights kept at
``--keep`` steps are scored on a fixed held-out batch: Fashion-MNIST test images, their labels,
fixed t (stratified over [t_end, 1]), noise and augmentation levels (U[0, --aug-max]), the mean
squared eps error (the training loss, without its sampling noise), over all t and over t > 0.5
alone (small in eps: x_t is mostly noise there). Also the loss the bundled model itself
has on the same batch (the upsampler: without the low-resolution input).

Writes bench/results/cascade/init[_base].json and prints a markdown table.

    python bench/bench_cascade_init.py --steps 100 --keep 25,50,100 --threads 1
    python bench/bench_cascade_init.py --stage base --steps 100 --keep 25,50,100 --threads 1
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from genie_fast.data import load_fashion_mnist  # noqa: E402
from genie_fast.models.default import default_model_path, load_default  # noqa: E402
from genie_fast.models.unet import CONFIGS, UNet, UNetConfig  # noqa: E402
from genie_fast.schedule import VPSchedule  # noqa: E402
from genie_fast.train import build_parser, load_checkpoint, train  # noqa: E402
from genie_fast.training.cascade import fit_images, low_res_cond  # noqa: E402

CONFIG = {"sr": "fmnist_sr", "base": "fmnist16_cond"}


def eval_batch(n: int, aug_max: float, stage: str = "sr", seed: int = 123):
    """(x_t, t, z, labels, cond) of n test images: everything fixed by ``seed``."""
    x0, y = load_fashion_mnist("test")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x0), generator=g)[:n]
    x0, y = fit_images(x0[idx], CONFIGS[CONFIG[stage]]), y[idx]
    s = VPSchedule()
    t = s.t_end + (1 - s.t_end) * (torch.arange(n) + torch.rand(n, generator=g)) / n
    z = torch.randn(x0.shape, generator=g)
    x_t = s.alpha(t).view(-1, 1, 1, 1) * x0 + s.sigma(t).view(-1, 1, 1, 1) * z
    cond = low_res_cond(x0, CONFIGS["fmnist_sr"], aug_max, s, g) if stage == "sr" else {}
    return x_t, t, z, y, cond


@torch.no_grad()
def score(net, batch, cond=True) -> dict:
    """{"all": the mean squared eps error, "t>0.5": the same over t > 0.5}."""
    x_t, t, z, y, c = batch
    out = [net(x_t[i:i + 64], t[i:i + 64], labels=y[i:i + 64], **({k: v[i:i + 64] for k, v in c.items()} if cond else {}))
           for i in range(0, len(t), 64)]
    err = (torch.cat(out) - z).pow(2).flatten(1).mean(1)
    return {"all": float(err.mean()), "t>0.5": float(err[t > 0.5].mean())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=("sr", "base"), default="sr")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--keep", default="25,50,100")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--aug-max", type=float, default=0.3)
    p.add_argument("--eval-n", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", default=None, help="default: runs/cascade_init[_base]")
    p.add_argument("--out", default=None, help="default: bench/results/cascade/init[_base].json")
    a = p.parse_args(argv)
    tag = "" if a.stage == "sr" else "_base"
    a.runs = a.runs or f"runs/cascade_init{tag}"
    a.out = a.out or str(ROOT / "bench" / "results" / "cascade" / f"init{tag}.json")
    torch.set_num_threads(a.threads)
    keep = sorted({int(k) for k in a.keep.split(",")} | {a.steps})
    batch = eval_batch(a.eval_n, a.aug_max, a.stage)
    rows = {"bundled model": score(load_default().unet, batch, cond=False)}
    times = {}
    for name, extra in (("fresh", []), ("from bundled", ["--init-model", str(default_model_path())])):
        out = Path(a.runs) / name.replace(" ", "_")
        args = build_parser().parse_args(["--config", CONFIG[a.stage], "--out", str(out), "--steps", str(a.steps),
                                          "--batch", str(a.batch), "--lr", str(a.lr), "--warmup", str(a.warmup),
                                          "--aug-max", str(a.aug_max), "--threads", str(a.threads),
                                          "--keep-at", ",".join(map(str, keep)), "--log-every", "25",
                                          "--overwrite", *extra])
        t0 = time.time()
        train(args)
        times[name] = time.time() - t0
        for k in keep:
            state = load_checkpoint(out / f"ckpt_step{k}.pt")
            net = UNet(UNetConfig.from_dict(state["config"]))
            net.load_state_dict(state["model"])
            rows.setdefault(name, {})[k] = score(net.eval(), batch)
    result = {"stage": a.stage, "config": CONFIG[a.stage], "steps": a.steps, "batch": a.batch, "lr": a.lr, "warmup": a.warmup, "aug_max": a.aug_max,
              "eval_n": a.eval_n, "threads": a.threads, "train_s": times, "eval_loss": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"| {CONFIG[a.stage]}: start | " + " | ".join(f"step {k}: all t, t > 0.5" for k in keep) + " |")
    print("|---|" + "---|" * len(keep))
    for name in ("fresh", "from bundled"):
        print(f"| {name} | " + " | ".join(f"{rows[name][k]['all']:.4f}, {rows[name][k]['t>0.5']:.4f}" for k in keep)
              + " |")
    b = rows["bundled model"]
    print(f"(the bundled model{' without the low-resolution input' if a.stage == 'sr' else ''}: {b['all']:.4f}, "
          f"{b['t>0.5']:.4f}; train seconds {times})")


if __name__ == "__main__":
    main()
