"""Train an eps-prediction U-Net on Fashion-MNIST (continuous VP, t ~ U[t_end, 1]).

Loss: || eps_theta(alpha_t x_0 + sigma_t z, t) - z ||^2 (mean over pixels). Adam with linear
warmup, gradient clipping, EMA of the weights. Checkpoints (model, EMA, optimiser, step, RNG) are
written atomically every few minutes; ``--resume`` continues from the last one. A line per log
interval (step, loss, steps/s, wall time) goes to ``<out>/log.txt``. That loop, `run_steps`, is the
one every training run uses (``genie_fast.training.run``; ``genie_fast.distill`` and ``distill --diffusers``
give it their head loss).

The cascade's stages (issue 32, `genie_fast.training.cascade`): a config of smaller ``image_size``
(``fmnist16_cond``) trains on the images average-pooled to it; a super-resolution config
(``fmnist_sr``) on (image, its noised low-resolution version, the noise level), ``--aug-max``.

    python -m genie_fast.train --out runs/fmnist --steps 8000 --resume
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
from pathlib import Path

import torch

from ..data import infinite_batches, load_fashion_mnist
from ..models.unet import CONFIGS, UNet, UNetConfig, count_parameters
from ..schedule import VPSchedule, q_sample
from .cascade import DEFAULT_AUG_MAX, check_aug_max, fit_images, init_low_res_from, low_res_cond
from .run import (TRAIN_KEYS, add_run_args, check_run_args, drop_labels, jsonable_args, load_checkpoint, load_state,
                  open_run_log, run_steps, save_checkpoint)

__all__ = ["diffusion_loss", "null_teacher_loss", "load_null_teacher", "build_parser", "init_from_checkpoint",
           "init_from_model", "train", "main"]


def diffusion_loss(model, x0: torch.Tensor, schedule: VPSchedule, generator: torch.Generator | None = None,
                   labels: torch.Tensor | None = None, cond: dict | None = None):
    """Mean squared eps error at t ~ U[t_end, 1] (labels: for a class-conditional model; cond: further
    inputs, e.g. a super-resolution network's low_res and aug_level, `training.cascade.low_res_cond`)."""
    x_t, t, z = q_sample(x0, schedule, generator)
    kw = ({} if labels is None else {"labels": labels}) | (cond or {})
    return (model(x_t, t, **kw) - z).pow(2).mean()


def null_teacher_loss(model, teacher, x0: torch.Tensor, labels: torch.Tensor, num_classes: int,
                      schedule: VPSchedule, generator: torch.Generator | None = None):
    """`diffusion_loss`, except that null-label samples regress onto ``teacher``'s eps (an unconditional
    network) instead of the drawn noise. Returns (loss, the null-label samples' share of it).

    The noise is an unbiased but noisy target for E[z | x_t]; an unconditional teacher is a low-variance
    estimate of the same function, so the null class of a conditional fine-tune stays as good as the
    model it started from while the labelled samples learn the classes.
    """
    x_t, t, z = q_sample(x0, schedule, generator)
    null = labels == num_classes
    target = z.clone()
    if bool(null.any()):
        with torch.no_grad():
            target[null] = teacher(x_t[null], t[null]).to(z.dtype)
    err = (model(x_t, t, labels=labels) - target).pow(2)
    return err.mean(), (err[null].sum() / err.numel()).detach()


def load_null_teacher(stem: str | os.PathLike, config: UNetConfig) -> torch.nn.Module:
    """The U-Net of exported model ``stem`` as a frozen teacher for the null class (`null_teacher_loss`)."""
    from ..models.default import load_model

    if config.low_res_size:
        raise ValueError("--null-teacher: a super-resolution config's null class is conditioned on its "
                         "low-resolution input, which an unconditional teacher does not see")
    if config.num_classes <= 0:
        raise ValueError("--null-teacher trains a class-conditional config's null class; "
                         f"this config has no classes ({config.to_dict()})")
    unet = load_model(stem).unet
    if unet.config.num_classes > 0:
        raise ValueError(f"--null-teacher {stem}: the teacher must be an unconditional model; it has "
                         f"{unet.config.num_classes} classes")
    if (unet.config.in_channels, unet.config.image_size) != (config.in_channels, config.image_size):
        raise ValueError(f"--null-teacher {stem}: its images ({unet.config.in_channels} x {unet.config.image_size}^2) "
                         f"differ from this config's ({config.in_channels} x {config.image_size}^2)")
    unet.eval().requires_grad_(False)
    return unet


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(p, out="runs/fmnist", steps=8000, batch=64, lr=4e-4, warmup=200, ema=0.999, log_every=50)
    p.add_argument("--config", default="fmnist_small", help=f"UNet config name, one of {sorted(CONFIGS)}")
    p.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start a fresh run from the EMA weights of another training checkpoint of the "
                        "same architecture (its time input may differ: the time MLP then re-learns)")
    p.add_argument("--init-model", default=None, metavar="STEM",
                   help="start a fresh run from the U-Net of an exported model (<STEM>.safetensors + .json); "
                        "a class-conditional config may start from an unconditional model (its label "
                        "embedding starts at zero)")
    p.add_argument("--label-dropout", type=float, default=0.15,
                   help="class-conditional configs: probability of training a sample with the null label")
    p.add_argument("--label-lr-mult", type=float, default=20.0,
                   help="class-conditional configs: learning-rate multiplier of the label embedding")
    p.add_argument("--null-teacher", default=None, metavar="STEM",
                   help="class-conditional configs: null-label samples regress onto the eps of this "
                        "unconditional exported model instead of the noise (keeps the null class as good)")
    p.add_argument("--aug-max", type=float, default=DEFAULT_AUG_MAX,
                   help="super-resolution configs (fmnist_sr): the low-resolution input is noised at a level "
                        "s ~ U[0, AUG_MAX] (VP time) that the network is told (noise-conditioning augmentation; "
                        f"default {DEFAULT_AUG_MAX})")
    return p


def init_from_checkpoint(model: UNet, path: str | os.PathLike) -> int:
    """Load the EMA weights of training checkpoint ``path`` into ``model``; returns its step."""
    state = load_checkpoint(Path(path), ("config", "ema", "step"))
    theirs = {k: v.shape for k, v in state["ema"].items()}
    ours = {k: v.shape for k, v in model.state_dict().items()}
    if theirs != ours:
        diff = sorted(set(theirs.items()) ^ set(ours.items()))[:4]
        raise ValueError(f"--init-from {path}: its U-Net ({state['config']}) has other parameters than "
                         f"this config ({model.config.to_dict()}); first differences: {diff}")
    load_state(model, state, "ema", path)
    return int(state["step"])


def init_from_model(model: UNet, stem: str | os.PathLike) -> None:
    """Load the U-Net of an exported model into ``model``; only a label embedding may be new (and,
    for a super-resolution config from a network without a low-resolution input, that input:
    `training.cascade.init_low_res_from`)."""
    from ..models.default import load_model

    src = load_model(stem).unet.state_dict()
    if model.config.low_res_size and "aug_emb.2.weight" not in src:
        init_low_res_from(model, src, f"--init-model {stem}")
        return
    ours = model.state_dict()
    new = sorted(set(ours) - set(src))
    if any(not k.startswith("label_emb.") for k in new) or set(src) - set(ours) or any(
            src[k].shape != ours[k].shape for k in src):
        raise ValueError(f"--init-model {stem}: its U-Net does not match config {model.config.to_dict()} "
                         f"(only a new label embedding may differ)")
    model.load_state_dict(src, strict=False)


def train(args) -> Path:
    check_run_args(args, {"--label-lr-mult": (getattr(args, "label_lr_mult", 1.0), 0.0, math.inf)})
    aug_max = check_aug_max(getattr(args, "aug_max", DEFAULT_AUG_MAX))
    if args.config not in CONFIGS:
        raise ValueError(f"--config {args.config!r} is not a U-Net config; choose one of {sorted(CONFIGS)}")
    if getattr(args, "init_from", None) and getattr(args, "init_model", None):
        raise ValueError("--init-from and --init-model both give the starting weights: give one of them")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    ckpt_path = out / "ckpt.pt"
    schedule = VPSchedule()

    if args.resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, TRAIN_KEYS)
        config = UNetConfig.from_dict(state["config"])
        model = UNet(config)
        load_state(model, state, "model", ckpt_path)
        ema = copy.deepcopy(model)
        load_state(ema, state, "ema", ckpt_path)
        step, wall = state["step"], state["wall_s"]
        if config.low_res_size and state.get("aug_max", aug_max) != aug_max:
            raise ValueError(f"{ckpt_path} was trained with --aug-max {state['aug_max']}, not {aug_max}: resume it "
                             f"with that, or start over with another --out or --overwrite")
    else:
        if args.resume:
            print(f"--resume: no checkpoint at {ckpt_path}, starting fresh")
        torch.manual_seed(args.seed)
        config = CONFIGS[args.config]
        model = UNet(config)
        if args.init_from:
            src_step = init_from_checkpoint(model, args.init_from)
            print(f"initialised from the EMA weights of {args.init_from} (step {src_step})")
        elif args.init_model:
            init_from_model(model, args.init_model)
            print(f"initialised from the U-Net of {args.init_model}")
        ema = copy.deepcopy(model)
        step, wall, state = 0, 0.0, None
    ema.eval()
    teacher = load_null_teacher(args.null_teacher, config) if getattr(args, "null_teacher", None) else None
    # A new label embedding (zero at the start of a fine-tune) learns at label_lr_mult x the base rate:
    # at the base rate it stayed ~50x smaller than the time embedding after 1,100 steps (no effect).
    label_params = list(model.label_emb.parameters()) if model.label_emb is not None else []
    label_ids = {id(p) for p in label_params}
    groups = [{"params": [p for p in model.parameters() if id(p) not in label_ids], "lr_mult": 1.0}]
    if label_params:
        groups.append({"params": label_params, "lr_mult": float(getattr(args, "label_lr_mult", 1.0))})
    opt = torch.optim.Adam(groups, lr=args.lr)
    if state is not None:
        opt.load_state_dict(state["opt"])

    x_train, y_train = load_fashion_mnist("train", root=args.data_root)
    x_train = fit_images(x_train, config)  # the cascade's base model: the images average-pooled
    # A fresh data/noise stream per resume, seeded by the step, keeps runs reproducible per segment.
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    conditional = config.num_classes > 0
    batches = infinite_batches(x_train, args.batch, gen, labels=y_train if conditional else None)

    meta = {"config": config.to_dict(), "schedule": {"beta_min": schedule.beta_min, "beta_d": schedule.beta_d,
            "t_end": schedule.t_end}, "args": jsonable_args(args), "params": count_parameters(model)}
    log = open_run_log(out, meta, f"# start step={step} params={meta['params']} args={json.dumps(jsonable_args(args))}")

    def checkpoint(step, wall):
        save_checkpoint(ckpt_path, {"config": config.to_dict(), "model": model.state_dict(),
                                    "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                                    "wall_s": wall, "schedule": meta["schedule"],
                                    **({"aug_max": aug_max} if config.low_res_size else {})})

    def step_loss():
        if not conditional:
            x0 = next(batches)
            cond = low_res_cond(x0, config, aug_max, schedule, gen) if config.low_res_size else None
            return diffusion_loss(model, x0, schedule, gen, cond=cond), {}
        x0, y = next(batches)
        labels = drop_labels(y, config.num_classes, args.label_dropout, gen)
        if teacher is None:
            cond = low_res_cond(x0, config, aug_max, schedule, gen) if config.low_res_size else None
            return diffusion_loss(model, x0, schedule, gen, labels, cond), {}
        loss, null_part = null_teacher_loss(model, teacher, x0, labels, config.num_classes, schedule, gen)
        return loss, {"null_part": null_part.item()}

    model.train()
    step, wall = run_steps(args, opt=opt, step=step, wall=wall, step_loss=step_loss, trained=model.parameters(),
                           ema_pairs=[(ema, model)], checkpoint=checkpoint, ckpt_path=ckpt_path, log=log, desc="train")
    log.write(f"# done step={step} wall_s={wall:.0f}\n")
    log.close()
    return ckpt_path


def main(argv=None):
    train(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
