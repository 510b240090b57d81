"""Distil the GENIE head from exact JVPs of a frozen score network (GENIE Sec. 3.2).

Target, along the DDIM ODE d x_bar / d gamma = eps with x = x_bar / sqrt(1 + gamma^2):

    d eps / d gamma = J_x eps . dx/dgamma + d eps/dt . dt/dgamma,
    dx/dgamma = eps / sqrt(1 + gamma^2) - x gamma / (1 + gamma^2),

one forward-mode JVP of eps(x, t) with tangents (dx/dgamma, dt/dgamma), where eps in dx/dgamma is
the network's own prediction. Loss: gamma^2 || k_psi - target ||^2 summed over pixels, averaged
over the batch, t ~ U[t_end, 1], x_t = alpha_t x_0 + sigma_t z. The head is fed eps_theta (not the
true noise z), as it will be at sampling time.

    python -m genie_fast.distill --unet-ckpt runs/fmnist/ckpt.pt --out runs/distill --steps 2000 --resume
"""
from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import torch

from .data import infinite_batches, load_fashion_mnist
from .models.head import GenieHead, GenieModel, HeadConfig
from .ops import head_combine_ref
from .models.unet import UNet, UNetConfig, count_parameters
from .schedule import VPSchedule, ode_tangents, q_sample
from .solvers import jvp
from .checks import check_int
from .train import (DISTILL_KEYS, add_run_args, check_run_args, drop_labels, jsonable_args, load_checkpoint,
                    load_state, open_run_log, run_steps, save_checkpoint)


def jvp_deps(eps_fn, x: torch.Tensor, t: torch.Tensor, schedule, eps: torch.Tensor | None = None):
    """Exact (eps, d eps / d gamma) along the ODE by forward-mode autodiff (`solvers.jvp`, which
    runs through attention and GroupNorm).

    eps_fn(x, t) -> eps with x (B, C, H, W), t (B,). Costs one forward (skipped when eps is
    given) plus one JVP (about 4 forwards on the CPU, `solvers.JVP_NFE`).
    """
    if eps is None:
        with torch.no_grad():
            eps = eps_fn(x, t)
    dx, dt = ode_tangents(eps, x, t, schedule)
    with torch.no_grad():
        eps_out, deps = jvp(eps_fn, (x, t.contiguous()), (dx, dt.contiguous()))
    return eps_out, deps


def head_loss(model: GenieModel, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None):
    """gamma^2-weighted squared error of the head against the exact JVP, summed over pixels.

    labels: for a class-conditional network (the JVP is taken along that label's ODE).
    Returns (loss, relative L2 error of d eps/d gamma per batch, detached).
    """
    unet = model.unet
    with torch.no_grad():
        eps, features, temb = unet(x_t, t, return_features=True, labels=labels)
        _, target = jvp_deps(lambda x, tt: unet(x, tt, labels=labels), x_t, t, model.schedule, eps=eps)
    head_out = model.head(x_t, eps, features, temb)
    gamma = model.schedule.gamma(t)[:, None, None, None].to(x_t.dtype)
    deps = head_combine_ref(head_out, gamma)
    loss = (gamma * (deps - target)).pow(2).flatten(1).sum(1).mean()
    with torch.no_grad():
        rel = ((deps - target).flatten(1).norm(dim=1) / target.flatten(1).norm(dim=1).clamp_min(1e-12)).mean()
    return loss, rel


def sample_xt(x0: torch.Tensor, schedule, generator=None):
    """(x_t, t) of q(x_t | x_0) at t ~ U[t_end, 1] (`schedule.q_sample`)."""
    x_t, t, _ = q_sample(x0, schedule, generator)
    return x_t, t


def head_state(model, state: dict | None, ckpt_path: Path, lr: float):
    """(ema_head, opt, step, wall) of a head run on ``model.head``: fresh, or resumed from checkpoint ``state``."""
    ema_head = copy.deepcopy(model.head)
    opt = torch.optim.Adam(model.head.parameters(), lr=lr)
    if state is None:
        return ema_head, opt, 0, 0.0
    load_state(model.head, state, "head", ckpt_path)
    load_state(ema_head, state, "ema_head", ckpt_path)
    opt.load_state_dict(state["opt"])
    return ema_head, opt, state["step"], state["wall_s"]


def train_head(args, model, ema_head, opt, step: int, wall: float, batches, gen: torch.Generator, num_classes: int,
               checkpoint, ckpt_path: Path, log, desc: str) -> tuple[int, float]:
    """`train.run_steps` with the head loss: x_0 (and labels, dropped to the null class at
    ``args.label_dropout``) from ``batches``, x_t from q(x_t | x_0), the JVP target along their ODE."""
    def step_loss():
        labels = None
        if num_classes:
            x0, y = next(batches)
            labels = drop_labels(y, num_classes, getattr(args, "label_dropout", 0.15), gen)
        else:
            x0 = next(batches)
        x_t, t = sample_xt(x0, model.schedule, gen)
        loss, rel = head_loss(model, x_t, t, labels)
        return loss, {"rel_err": rel}

    return run_steps(args, opt=opt, step=step, wall=wall, step_loss=step_loss, trained=model.head.parameters(),
                     ema_pairs=[(ema_head, model.head)], checkpoint=checkpoint, ckpt_path=ckpt_path, log=log,
                     desc=desc)


def load_unet_from_train_ckpt(path: str | os.PathLike, use_ema: bool = True) -> UNet:
    state = load_checkpoint(Path(path), ("config", "ema" if use_ema else "model"))
    unet = UNet(UNetConfig.from_dict(state["config"]))
    load_state(unet, state, "ema" if use_ema else "model", path)
    return unet.eval()


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--unet-ckpt", default="runs/fmnist/ckpt.pt", help="training checkpoint (EMA weights used)")
    add_run_args(p, out="runs/distill", steps=2000, batch=32, lr=3e-4, warmup=100, ema=0.995, log_every=25)
    p.add_argument("--width", type=int, default=None, help="head width (default: the U-Net's nf)")
    p.add_argument("--head-blocks", type=int, default=1)
    p.add_argument("--init-head", default=None, metavar="STEM",
                   help="start a fresh run from the head of an exported model (<STEM>.safetensors + .json) "
                        "of the same head shape")
    p.add_argument("--label-dropout", type=float, default=0.15,
                   help="class-conditional networks: probability of distilling a sample along the null-label ODE")
    from .distill_diffusers import add_diffusers_args
    add_diffusers_args(p)
    return p


def check_distill_args(args):
    """Refuse impossible settings of a distillation run, and an unusable --out, before any work."""
    if args.width is not None:
        check_int("--width", args.width, 1)
    check_int("--head-blocks", args.head_blocks, 0)
    check_run_args(args)


def distill(args) -> Path:
    if getattr(args, "diffusers", None):  # a diffusers UNet2DModel: its own data and head format
        from .distill_diffusers import distill_diffusers
        return distill_diffusers(args)
    check_distill_args(args)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    ckpt_path = out / "ckpt.pt"
    schedule = VPSchedule()
    unet = load_unet_from_train_ckpt(args.unet_ckpt)
    for p in unet.parameters():
        p.requires_grad_(False)

    state = load_checkpoint(ckpt_path, DISTILL_KEYS) if (args.resume and ckpt_path.exists()) else None
    init_head = None
    if state is None:
        torch.manual_seed(args.seed)
        if getattr(args, "init_head", None):
            from .models.default import load_model
            init_head = load_model(args.init_head).head
            head_cfg = init_head.config
            if (head_cfg.feature_channels, head_cfg.temb_dim) != (unet.feature_channels, unet.temb_dim):
                raise ValueError(f"--init-head {args.init_head}: its head reads {head_cfg.feature_channels} "
                                 f"features / temb {head_cfg.temb_dim}, this U-Net gives "
                                 f"{unet.feature_channels} / {unet.temb_dim}")
        else:
            head_cfg = HeadConfig.for_unet(unet, width=args.width, num_res_blocks=args.head_blocks)
    else:
        head_cfg = HeadConfig.from_dict(state["head_config"])
    model = GenieModel(unet, GenieHead(head_cfg), schedule)
    if init_head is not None:
        model.head.load_state_dict(init_head.state_dict())
    ema_head, opt, step, wall = head_state(model, state, ckpt_path, args.lr)

    x_train, y_train = load_fashion_mnist("train", root=args.data_root)
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step + 7)
    num_classes = unet.config.num_classes
    batches = infinite_batches(x_train, args.batch, gen, labels=y_train if num_classes else None)
    meta = {"head_config": head_cfg.to_dict(), "head_params": count_parameters(model.head),
            "unet_params": count_parameters(unet), "args": jsonable_args(args)}
    log = open_run_log(out, meta, f"# start step={step} {json.dumps(meta)}")

    def checkpoint(step, wall):
        save_checkpoint(ckpt_path, {"head_config": head_cfg.to_dict(), "head": model.head.state_dict(),
                                    "ema_head": ema_head.state_dict(), "opt": opt.state_dict(),
                                    "step": step, "wall_s": wall, "unet_ckpt": str(args.unet_ckpt)})

    step, wall = train_head(args, model, ema_head, opt, step, wall, batches, gen, num_classes, checkpoint, ckpt_path,
                            log, "distill")
    log.write(f"# done step={step} wall_s={wall:.0f}\n")
    log.close()
    return ckpt_path


def model_from_ckpts(unet_ckpt, head_ckpt, use_ema: bool = True) -> GenieModel:
    """GenieModel from a training checkpoint and a distillation checkpoint (EMA weights)."""
    unet = load_unet_from_train_ckpt(unet_ckpt, use_ema)
    state = load_checkpoint(Path(head_ckpt), ("head_config", "ema_head" if use_ema else "head"))
    head = GenieHead(HeadConfig.from_dict(state["head_config"]))
    load_state(head, state, "ema_head" if use_ema else "head", head_ckpt)
    return GenieModel(unet, head, VPSchedule()).eval()


def main(argv=None):
    distill(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
