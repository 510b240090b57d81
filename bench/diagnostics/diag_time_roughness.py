"""Is the score network smooth in t on the scale of a solver step? (issue 3's head-lag diagnosis)

GENIE's Taylor step and its head distillation both use the *local* derivative d eps/d gamma. If
eps wiggles in t on a scale far below a solver step, that derivative says little about how eps
changes over the step. For each training checkpoint and a few t, on 8 noised training images,
this prints the relative L2 difference between the exact derivative (forward-mode JVP) and central
finite differences over growing half-widths:

* ``dt``: the partial d eps/dt at fixed x (where the time embedding acts), half-width delta in t;
* ``ode``: the total d eps/d gamma along the ODE, x moved by +-Delta * dx/dgamma, half-width
  Delta = delta * dgamma/dt in gamma (the same span in t).

A smooth network gives small numbers at every half-width up to a solver step (logSNR grid at 10
NFE: steps of 0.003-0.2 in t); at delta = 1e-4 both columns check the JVP itself (~0). "nan": the
span would leave [t_end, 1].

    python bench/diagnostics/diag_time_roughness.py genie_fast/assets/fmnist_genie runs/fmnist_lg/ckpt.pt

Each model: an exported model stem or a training state (.pt, its EMA weights).
"""
import argparse

import torch

from genie_fast.data import load_fashion_mnist
from genie_fast.distill import load_unet_from_train_ckpt, ode_tangents
from genie_fast.models.default import load_model
from genie_fast.schedule import VPSchedule
from genie_fast.solvers import jvp  # forward AD through attention and GroupNorm

TS = (0.02, 0.1, 0.3, 0.6)
DELTAS = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def roughness(unet, schedule, x0: torch.Tensor, seed: int = 0) -> dict:
    """{t: {"dt": [rel err per delta], "ode": [...]}} for the DELTAS."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for tval in TS:
        t = torch.full((x0.shape[0],), tval)
        z = torch.randn(x0.shape, generator=g)
        xt = schedule.alpha(t)[:, None, None, None] * x0 + schedule.sigma(t)[:, None, None, None] * z
        with torch.no_grad():
            eps = unet(xt, t)
            dx, dtg = ode_tangents(eps, xt, t, schedule)  # per unit gamma
            _, part_t = jvp(unet, (xt, t), (torch.zeros_like(xt), torch.ones_like(t)))
            _, total = jvp(unet, (xt, t), (dx, dtg))
            row_t, row_ode = [], []
            for d in DELTAS:
                if tval - d < schedule.t_end:  # the network is only defined on [t_end, 1]
                    row_t.append(float("nan"))
                    row_ode.append(float("nan"))
                    continue
                fd_t = (unet(xt, t + d) - unet(xt, t - d)) / (2 * d)
                big = d / dtg[:, None, None, None]  # the same span in gamma
                fd_ode = (unet(xt + big * dx, t + d) - unet(xt - big * dx, t - d)) / (2 * big)
                row_t.append(rel(fd_t, part_t))
                row_ode.append(rel(fd_ode, total))
        out[tval] = {"dt": row_t, "ode": row_ode}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="exported model stems or training states (.pt: EMA weights)")
    p.add_argument("--n", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(1)
    schedule = VPSchedule()
    x0 = load_fashion_mnist("train")[0][: args.n]
    head = " ".join(f"{d:>7g}" for d in DELTAS)
    for path in args.models:
        unet = load_unet_from_train_ckpt(path) if path.endswith(".pt") else load_model(path).unet
        print(f"{path} (time input {unet.config.time_input}): relative difference, exact vs central FD, "
              f"half-width in t = {head}")
        for tval, r in roughness(unet, schedule, x0).items():
            for kind in ("dt", "ode"):
                print(f"  t={tval:<5} {kind:<4}" + " ".join(f"{v:7.2f}" for v in r[kind]))


if __name__ == "__main__":
    main()
