"""Why the distilled GENIE head lags: how the exact d eps/d gamma target is made up, per t.

For 16 Fashion-MNIST training images at fixed t it prints, gamma-weighted:
the RMS of the space part J_x eps . dx/dgamma and of the time part d eps/dt . dt/dgamma, their
cosine, and how much of the total a per-t least-squares fit a*eps + b*x_t explains.

    python bench/diagnostics/diag_head_target.py [--model runs/fmnist/ckpt.pt]

--model: an exported model stem (default: the bundled genie_fast/assets/fmnist_genie) or a
training state (.pt, its EMA weights).
"""
import argparse

import torch

from genie_fast.data import load_fashion_mnist
from genie_fast.distill import load_unet_from_train_ckpt, ode_tangents
from genie_fast.models.default import default_model_path, load_model
from genie_fast.schedule import VPSchedule
from genie_fast.solvers import jvp  # forward AD through attention and GroupNorm


def load_unet(path: str):
    """The U-Net of an exported model stem, or the EMA U-Net of a training state (.pt)."""
    return load_unet_from_train_ckpt(path) if path.endswith(".pt") else load_model(path).unet


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(default_model_path()))
    p.add_argument("--n", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(1)
    unet, s = load_unet(args.model), VPSchedule()
    x0 = load_fashion_mnist("train")[0][: args.n]
    g = torch.Generator().manual_seed(0)
    for tval in (0.002, 0.01, 0.05, 0.2, 0.5, 0.9):
        t = torch.full((args.n,), tval)
        z = torch.randn(x0.shape, generator=g)
        xt = s.alpha(t)[:, None, None, None] * x0 + s.sigma(t)[:, None, None, None] * z
        with torch.no_grad():
            eps = unet(xt, t)
            dx, dt = ode_tangents(eps, xt, t, s)
            _, jx = jvp(unet, (xt, t), (dx, torch.zeros_like(dt)))
            _, jt = jvp(unet, (xt, t), (torch.zeros_like(dx), dt))
        deps, gam = jx + jt, s.gamma(tval)
        a = torch.stack([eps.flatten(), xt.flatten()], 1)
        resid = deps.flatten() - (a @ torch.linalg.lstsq(a, deps.flatten()[:, None]).solution).flatten()
        cos = torch.nn.functional.cosine_similarity(jx.flatten(), jt.flatten(), 0)
        print(f"t={tval:<6} gamma={gam:8.4g}  gamma*rms: space {gam * jx.pow(2).mean().sqrt():.3g} "
              f"time {gam * jt.pow(2).mean().sqrt():.3g} total {gam * deps.pow(2).mean().sqrt():.3g}  "
              f"cos(space,time) {cos:+.3f}  linear fit explains {1 - (resid.norm() / deps.norm()) ** 2:.2f}")


if __name__ == "__main__":
    main()
