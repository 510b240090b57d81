"""Does the cascade's upsampler (config ``fmnist_sr``) train faster from the bundled 32x32 model's
weights (its new low-resolution input channels and augmentation embedding at zero,
`training.cascade.init_low_res_from`) than from a fresh initialisation? (issue 32)

Two `genie-fast train --config fmnist_sr` runs with the same seed, data order and settings, one
with ``--init-model`` (the bundled model), for ``--steps`` steps; the live weights kept at
``--keep`` steps are scored on a fixed held-out batch: Fashion-MNIST test images, their labels,
fixed t (stratified over [t_end, 1]), noise and augmentation levels (U[0, --aug-max]), the mean
squared eps error (the training loss, without its sampling noise). Also the loss the bundled
model itself has on the same batch (no low-resolution input) as the floor a fresh network must
first reach.

Writes bench/results/cascade/init.json and prints a markdown table.

    python bench/bench_cascade_init.py --steps 100 --keep 25,50,100 --threads 1
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
from genie_fast.models.unet import UNet, UNetConfig  # noqa: E402
from genie_fast.schedule import VPSchedule  # noqa: E402
from genie_fast.train import build_parser, load_checkpoint, train  # noqa: E402
from genie_fast.training.cascade import low_res_cond  # noqa: E402


def eval_batch(n: int, aug_max: float, seed: int = 123):
    """(x_t, t, z, labels, cond) of n test images: everything fixed by ``seed``."""
    x0, y = load_fashion_mnist("test")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x0), generator=g)[:n]
    x0, y = x0[idx], y[idx]
    s = VPSchedule()
    t = s.t_end + (1 - s.t_end) * (torch.arange(n) + torch.rand(n, generator=g)) / n
    z = torch.randn(x0.shape, generator=g)
    x_t = s.alpha(t).view(-1, 1, 1, 1) * x0 + s.sigma(t).view(-1, 1, 1, 1) * z
    cond = low_res_cond(x0, UNetConfig(**{**load_default().unet.config.to_dict(), "low_res_size": 16}), aug_max, s, g)
    return x_t, t, z, y, cond


@torch.no_grad()
def score(net, batch, cond=True) -> float:
    x_t, t, z, y, c = batch
    out = [net(x_t[i:i + 64], t[i:i + 64], labels=y[i:i + 64], **({k: v[i:i + 64] for k, v in c.items()} if cond else {}))
           for i in range(0, len(t), 64)]
    return float((torch.cat(out) - z).pow(2).mean())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--keep", default="25,50,100")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--aug-max", type=float, default=0.3)
    p.add_argument("--eval-n", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", default="runs/cascade_init")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "cascade" / "init.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    keep = sorted({int(k) for k in a.keep.split(",")} | {a.steps})
    batch = eval_batch(a.eval_n, a.aug_max)
    rows = {"bundled model, no low-res input": score(load_default().unet, batch, cond=False)}
    times = {}
    for name, extra in (("fresh", []), ("from bundled", ["--init-model", str(default_model_path())])):
        out = Path(a.runs) / name.replace(" ", "_")
        args = build_parser().parse_args(["--config", "fmnist_sr", "--out", str(out), "--steps", str(a.steps),
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
    result = {"steps": a.steps, "batch": a.batch, "lr": a.lr, "warmup": a.warmup, "aug_max": a.aug_max,
              "eval_n": a.eval_n, "threads": a.threads, "train_s": times, "eval_loss": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"| start | " + " | ".join(f"step {k}" for k in keep) + " |")
    print("|---|" + "---|" * len(keep))
    for name in ("fresh", "from bundled"):
        print(f"| {name} | " + " | ".join(f"{rows[name][k]:.4f}" for k in keep) + " |")
    print(f"(the bundled model without the low-resolution input: {rows['bundled model, no low-res input']:.4f}; "
          f"train seconds {times})")


if __name__ == "__main__":
    main()
