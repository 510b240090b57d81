"""Encoding with two heads of the same network (issue 27: a head fine-tuned for sampling must not make
encoding worse): test images encoded by `genie_multistep` on the uniform-in-t grid of N steps and
decoded on the same grid back (AFS off, as `encode` documents); the median per-image RMS error of
the round trip, and of the latent against a RK4 latent (100 steps, t_end -> 1) of the same network.

    PYTHONPATH=. python bench/diagnostics/diag_encode_head.py --old <stem> --new genie_fast/assets/fmnist_genie
(the distilled head's model: `git show 9b41e2c:genie_fast/assets/fmnist_genie.safetensors > old.safetensors`,
and its `.json` the same way)
"""
import argparse
import torch

import genie_fast
from genie_fast.data import load_fashion_mnist
from genie_fast.models import load_model
from genie_fast.reference import rk4_solve


def rk4_latent(model, x0, steps=100):
    """x at t = 1 of the ODE from x0 at t_end: RK4 in log gamma (`reference.rk4_solve`), float64 state."""
    s = model.schedule
    return rk4_solve(lambda x, t: model(x.float(), t.float()), x0, s, s.t_end, 1.0, steps).float()


def median_rms(a, b):
    return float((a - b).pow(2).flatten(1).mean(1).sqrt().median())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", required=True)
    p.add_argument("--new", required=True)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--steps", default="10,20")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    x_test, _ = load_fashion_mnist("test")
    models = {"old": load_model(args.old), "new": load_model(args.new)}
    x0 = x_test[: args.n]  # (n, 1, 32, 32) in [-1, 1]
    with torch.no_grad():
        ref = rk4_latent(models["new"], x0)  # the network alone (null class): the same in both models
    for steps in map(int, args.steps.split(",")):
        for name, m in models.items():
            ts = genie_fast.schedule.time_grid(m.schedule, steps, "uniform")
            z, _ = genie_fast.encode(m, x0, grid=ts)
            back, _ = genie_fast.sample(m, noise=z, grid=ts, afs=False)
            print(f"steps {steps} {name} head: latent vs RK4 {median_rms(z, ref):.4f}, "
                  f"round trip {median_rms(back, x0):.4f}", flush=True)


if __name__ == "__main__":
    main()
