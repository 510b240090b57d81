"""Distil the GENIE head from exact JVPs of a frozen score network (GENIE Sec. 3.2).

Target, along the DDIM ODE d x_bar / d gamma = eps with x = x_bar / sqrt(1 + gamma^2):

    d eps / d gamma = J_x eps . dx/dgamma + d eps/dt . dt/dgamma,
    dx/dgamma = eps / sqrt(1 + gamma^2) - x gamma / (1 + gamma^2),

one forward-mode JVP of eps(x, t) with tangents (dx/dgamma, dt/dgamma), where eps in dx/dgamma is
the network's own prediction (``--target jvp``, the default for genie_fast's own U-Net). Or
(``--target secant --span-t S``) the same derivative as a secant along the ODE over a span S in t
(`secant_deps`): for a network trained at integer timesteps only, which wiggles in t between them,
it is the slope a sampler's steps see (docs/method.md, section 5). Loss: gamma^2 || k_psi - target ||^2
summed over pixels, averaged over the batch, t ~ U[t_end, 1], x_t = alpha_t x_0 + sigma_t z. The
head is fed eps_theta (not the true noise z), as it will be at sampling time.

    python -m genie_fast.distill --unet-ckpt runs/fmnist/ckpt.pt --out runs/distill --steps 2000 --resume
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
from pathlib import Path

import torch

from ..checks import check_int, check_number
from ..data import infinite_batches, load_fashion_mnist
from ..models.head import GenieHead, GenieModel, HeadConfig
from ..models.unet import UNet, UNetConfig, count_parameters
from ..ops import head_combine_ref
from ..schedule import VPSchedule, ode_tangents, q_sample
from ..solvers import jvp
from .cascade import DEFAULT_AUG_MAX, check_aug_max, fit_images, low_res_cond
from .run import (DISTILL_KEYS, add_run_args, check_run_args, drop_labels, jsonable_args, load_checkpoint, load_state,
                  open_run_log, run_steps, save_checkpoint)

__all__ = ["TARGETS", "DEFAULT_SPAN_T", "jvp_deps", "check_span_t", "secant_times", "secant_deps", "distill_target",
           "head_loss", "sample_xt", "check_resumed_target", "head_state", "train_head", "load_unet_from_train_ckpt",
           "with_trained_unet", "build_parser", "check_distill_args", "distill", "model_from_ckpts"]


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


# Distillation targets: "jvp" (exact d eps/d gamma, `jvp_deps`) or "secant" (`secant_deps`).
TARGETS = ("jvp", "secant")
# The secant's span in t when none is given: 10 timesteps of a 1000-step schedule (measured against
# 0.05 and 0.1 on a diffusers model: bench/RESULTS.md, "A target matched to the solver").
DEFAULT_SPAN_T = 0.01


def check_span_t(span_t, schedule, name: str = "span_t") -> float:
    """``span_t`` as a float in (0, 1 - t_end]: the secant's span must fit inside the time range."""
    if isinstance(span_t, bool) or not isinstance(span_t, (int, float)) or not math.isfinite(span_t) \
            or not 0.0 < span_t <= 1.0 - schedule.t_end:
        raise ValueError(f"{name} (the secant target's span in t) must be a finite number in "
                         f"(0, 1 - t_end] = (0, {1.0 - schedule.t_end:g}], got {span_t!r}")
    return float(span_t)


def secant_times(t: torch.Tensor, span_t: float, schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (t_lo, t_hi) = (t - span_t / 2, t + span_t / 2), the window shifted (not cut) to lie
    inside [t_end, 1] where it sticks out, so every secant spans span_t (one-sided at the ends)."""
    lo = (t.to(torch.float64) - 0.5 * span_t).clamp(min=schedule.t_end)
    hi = lo + span_t
    top = hi > 1.0
    return torch.where(top, 1.0 - span_t, lo), torch.where(top, 1.0, hi)


def secant_deps(eps_fn, x: torch.Tensor, t: torch.Tensor, schedule, span_t: float = DEFAULT_SPAN_T,
                eps: torch.Tensor | None = None):
    """(eps, d eps / d gamma along the ODE as a secant over a span of span_t in t).

    From (x, t) the state moves along the DDIM ODE to t_lo and t_hi (`secant_times`) by one Euler
    step in gamma each, x_bar_+- = x_bar + (gamma_+- - gamma) eps, x_bar = x sqrt(1 + gamma^2) (a
    DDIM step), and the target is (eps(x_+, t_hi) - eps(x_-, t_lo)) / (gamma_hi - gamma_lo). Two
    forwards (one more when eps is not given) against the JVP's ~4. The Euler steps miss the ODE by
    (gamma_+- - gamma)^2 / 2 d eps/d gamma, which cancels in the difference up to the window's
    asymmetry in gamma, so the secant differs from the exact derivative by O(span_t^2) inside the
    range (first order where the window is shifted at the ends). A network that wiggles in t between
    the timesteps it was trained at has an exact derivative dominated by the wiggle; a span of a few
    timesteps averages it out.
    """
    span_t = check_span_t(span_t, schedule)
    with torch.no_grad():
        if eps is None:
            eps = eps_fn(x, t)
        t64 = t.to(torch.float64)
        g = schedule.gamma(t64)
        view = (-1, *([1] * (x.dim() - 1)))
        ends, gammas = [], []
        for t_side in secant_times(t64, span_t, schedule):
            g_side = schedule.gamma(t_side)
            root = torch.sqrt(1.0 + g_side * g_side)
            a = (torch.sqrt(1.0 + g * g) / root).to(x.dtype).view(view)  # x_bar / sqrt(1 + gamma_+-^2)
            b = ((g_side - g) / root).to(x.dtype).view(view)
            ends.append(eps_fn(a * x + b * eps.to(x.dtype), t_side.to(t.dtype)))
            gammas.append(g_side)
        deps = (ends[1] - ends[0]) / (gammas[1] - gammas[0]).to(ends[0].dtype).view(view)
    return eps, deps


def distill_target(eps_fn, x: torch.Tensor, t: torch.Tensor, schedule, target: str = "jvp",
                   span_t: float | None = None, eps: torch.Tensor | None = None):
    """(eps, the head's target d eps / d gamma): ``target="jvp"`` (`jvp_deps`, span_t must be None)
    or ``"secant"`` (`secant_deps` over span_t, `DEFAULT_SPAN_T` when None)."""
    if target == "jvp":
        if span_t is not None:
            raise ValueError(f"span_t applies to the secant target only, got span_t={span_t!r} with target='jvp'")
        return jvp_deps(eps_fn, x, t, schedule, eps=eps)
    if target == "secant":
        return secant_deps(eps_fn, x, t, schedule, DEFAULT_SPAN_T if span_t is None else span_t, eps=eps)
    raise ValueError(f"target must be one of {TARGETS}, got {target!r}")


def head_loss(model: GenieModel, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
              target: str = "jvp", span_t: float | None = None, cond: dict | None = None):
    """gamma^2-weighted squared error of the head against its target, summed over pixels.

    labels: for a class-conditional network (the target is taken along that label's ODE); cond:
    further conditioning inputs (B, ...) of the network (e.g. text embeddings), likewise: the head
    sees the features and embedding of the conditioned call, as when it samples.
    target, span_t: the exact JVP ("jvp", default) or a secant over span_t in t ("secant"),
    `distill_target`. Returns (loss, relative L2 error of d eps/d gamma per batch, detached).
    """
    unet, cond = model.unet, cond or {}
    with torch.no_grad():
        eps, features, temb = unet(x_t, t, return_features=True, labels=labels, **cond)
        _, goal = distill_target(lambda x, tt: unet(x, tt, labels=labels, **cond), x_t, t, model.schedule, target,
                                 span_t, eps=eps)
    head_out = model.head(x_t, eps, features, temb)
    gamma = model.schedule.gamma(t)[:, None, None, None].to(x_t.dtype)
    deps = head_combine_ref(head_out, gamma)
    loss = (gamma * (deps - goal)).pow(2).flatten(1).sum(1).mean()
    with torch.no_grad():
        rel = ((deps - goal).flatten(1).norm(dim=1) / goal.flatten(1).norm(dim=1).clamp_min(1e-12)).mean()
    return loss, rel


def sample_xt(x0: torch.Tensor, schedule, generator=None):
    """(x_t, t) of q(x_t | x_0) at t ~ U[t_end, 1] (`schedule.q_sample`)."""
    x_t, t, _ = q_sample(x0, schedule, generator)
    return x_t, t


def check_resumed_target(state: dict | None, args, ckpt_path: Path):
    """Refuse to resume a run with another target or span than the one it was started with."""
    if state is None or "target" not in state:
        return
    if (state["target"], state.get("span_t")) != (args.target, args.span_t):
        raise ValueError(f"{ckpt_path} was distilled with --target {state['target']}"
                         + (f" --span-t {state['span_t']}" if state.get("span_t") is not None else "")
                         + f", not --target {args.target}" + (f" --span-t {args.span_t}" if args.span_t else "")
                         + "; resume it with those, or start over with another --out or --overwrite")


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
               checkpoint, ckpt_path: Path, log, desc: str, cond: dict | None = None,
               negative: dict | None = None, make_cond=None) -> tuple[int, float]:
    """`run.run_steps` with the head loss: x_0 (and labels, dropped to the null class at
    ``args.label_dropout``) from ``batches``, x_t from q(x_t | x_0), the target along their ODE
    (``args.target``, ``args.span_t``: set by `check_distill_args`). cond: conditioning inputs with
    one row per data point (``batches`` then yields (x_0, row indices)); negative: the inputs of the
    negative branch (same rows), taken instead at ``args.label_dropout`` per sample, so the head
    learns both branches of guidance. make_cond: x_0 -> inputs drawn for that batch (a
    super-resolution network's noised low-resolution input, `training.cascade.low_res_cond`)."""
    def step_loss():
        labels, inputs = None, None
        if cond is not None:
            x0, idx = next(batches)
            inputs = {k: v[idx] for k, v in cond.items()}
            if negative is not None:
                drop = torch.rand(len(idx), generator=gen) < getattr(args, "label_dropout", 0.15)
                for k, v in negative.items():
                    inputs[k] = torch.where(drop.view(-1, *([1] * (v.dim() - 1))), v[idx], inputs[k])
        elif num_classes:
            x0, y = next(batches)
            labels = drop_labels(y, num_classes, getattr(args, "label_dropout", 0.15), gen)
        else:
            x0 = next(batches)
        x_t, t = sample_xt(x0, model.schedule, gen)
        if make_cond is not None:
            inputs = {**(inputs or {}), **make_cond(x0)}
        loss, rel = head_loss(model, x_t, t, labels, target=args.target, span_t=args.span_t, cond=inputs)
        return loss, {"rel_err": rel}

    return run_steps(args, opt=opt, step=step, wall=wall, step_loss=step_loss, trained=model.head.parameters(),
                     ema_pairs=[(ema_head, model.head)], checkpoint=checkpoint, ckpt_path=ckpt_path, log=log,
                     desc=desc)


def load_unet_from_train_ckpt(paths: str | os.PathLike, use_ema: bool = True) -> UNet:
    """The EMA (or live) U-Net of training checkpoint ``paths``; several comma-separated checkpoints
    (states of one run, e.g. taken along a fine-tune) are averaged weight by weight: a longer average
    than the run's EMA. Every checkpoint must hold the same U-Net config."""
    key = "ema" if use_ema else "model"
    names = [p for p in str(paths).split(",") if p]
    if not names:
        raise ValueError("unet checkpoint: no checkpoint path given")
    unets = []
    for name in names:
        state = load_checkpoint(Path(name), ("config", key))
        unets.append(UNet(UNetConfig.from_dict(state["config"])))
        if unets[-1].config.to_dict() != unets[0].config.to_dict():
            raise ValueError(f"unet checkpoints: {name} holds U-Net config {unets[-1].config.to_dict()}, not "
                             f"{unets[0].config.to_dict()} ({names[0]}); only states of one network average")
        load_state(unets[-1], state, key, name)
    if len(unets) > 1:
        states = [u.state_dict() for u in unets]
        unets[0].load_state_dict({k: sum(st[k].double() for st in states).div(len(states)).to(v.dtype)
                                  for k, v in states[0].items()})
    return unets[0].eval()


def with_trained_unet(stem: str | os.PathLike | None, unet_ckpts: str | None = None) -> GenieModel:
    """A saved model (``stem``; None: the bundled one), its U-Net replaced by the EMA network of
    training checkpoint(s) ``unet_ckpts`` when given (comma-separated: averaged,
    `load_unet_from_train_ckpt`), to measure a network in training with a saved head. The benchmarks'
    ``--model`` / ``--unet-ckpt``."""
    from ..models.default import load_default, load_model

    model = load_model(stem) if stem else load_default()
    if unet_ckpts is None:
        return model
    unet = load_unet_from_train_ckpt(unet_ckpts)
    if unet.config.to_dict() != model.unet.config.to_dict():  # the head reads the saved model's network
        raise ValueError(f"unet_ckpts: {unet_ckpts} holds U-Net config {unet.config.to_dict()}, not the saved "
                         f"model's {model.unet.config.to_dict()} (its head reads that network)")
    model.unet = unet
    model.provenance = {"unet_ckpt": [p for p in unet_ckpts.split(",") if p], "head": str(stem or "bundled")}
    return model.eval()


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The flags of a distillation run; the command line (``genie_fast.distill.build_parser``) adds
    those of ``--diffusers`` (`genie_fast.training.distill_diffusers.add_diffusers_args`)."""
    p = p or argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--unet-ckpt", default="runs/fmnist/ckpt.pt",
                   help="training checkpoint (EMA weights used); several, comma-separated: their average")
    add_run_args(p, out="runs/distill", steps=2000, batch=32, lr=3e-4, warmup=100, ema=0.995, log_every=25)
    p.add_argument("--width", type=int, default=None, help="head width (default: the U-Net's nf)")
    p.add_argument("--head-blocks", type=int, default=1)
    p.add_argument("--init-head", default=None, metavar="STEM",
                   help="start a fresh run from the head of an exported model (<STEM>.safetensors + .json) "
                        "of the same head shape")
    p.add_argument("--label-dropout", type=float, default=0.15,
                   help="class-conditional networks: probability of distilling a sample along the null-label ODE")
    p.add_argument("--target", choices=TARGETS, default=None,
                   help="what the head learns: 'jvp', the exact d eps/d gamma along the ODE (one forward-mode "
                        "JVP, ~4 forwards; the default for genie_fast's U-Net, trained on continuous t), or "
                        "'secant', the same derivative as a central difference along the ODE over --span-t "
                        "(2 forwards; the default with --diffusers: a network trained at integer timesteps "
                        "wiggles in t between them, which the exact derivative follows and a sampler's steps "
                        "do not; measured in bench/RESULTS.md)")
    p.add_argument("--span-t", type=float, default=None, metavar="S",
                   help=f"--target secant: the span in t of each secant, centred on t and shifted inside "
                        f"[t_end, 1] at the ends; for an N-step discrete schedule (diffusers) S*N timesteps "
                        f"(default {DEFAULT_SPAN_T}: 10 of 1000)")
    p.add_argument("--aug-max", type=float, default=DEFAULT_AUG_MAX,
                   help="a super-resolution network: the head is distilled along the ODEs of low-resolution "
                        "inputs noised at s ~ U[0, AUG_MAX], as the network was trained "
                        f"(default {DEFAULT_AUG_MAX})")
    return p


def check_distill_args(args, default_target: str = "jvp"):
    """Refuse impossible settings of a distillation run, and an unusable --out, before any work.

    Sets ``args.target`` (``default_target`` when not given) and ``args.span_t`` (`DEFAULT_SPAN_T`
    for the secant target when not given; None for the JVP)."""
    target = getattr(args, "target", None) or default_target
    if target not in TARGETS:
        raise ValueError(f"--target must be one of {TARGETS}, got {target!r}")
    span_t = getattr(args, "span_t", None)
    if target == "jvp" and span_t is not None:
        raise ValueError(f"--span-t sets the secant target's span; it needs --target secant (the target here is "
                         f"'jvp'), got --span-t {span_t!r}")
    if target == "secant":
        span_t = check_number("--span-t", DEFAULT_SPAN_T if span_t is None else span_t, 0.0, 1.0,
                              low_open=True, high_open=True)
    args.target, args.span_t = target, span_t
    if args.width is not None:
        check_int("--width", args.width, 1)
    check_int("--head-blocks", args.head_blocks, 0)
    check_aug_max(getattr(args, "aug_max", DEFAULT_AUG_MAX))
    check_run_args(args)


def distill(args) -> Path:
    """The distillation run of genie_fast's own U-Net (``--unet-ckpt``); returns its checkpoint.
    (``distill --diffusers DIR`` is `genie_fast.training.distill_diffusers.distill_diffusers`, which the
    command line, ``genie_fast.distill.distill``, dispatches to.)"""
    if getattr(args, "diffusers", None):
        raise ValueError("--diffusers: a diffusers model is distilled by genie_fast.distill.distill (the command "
                         "line) or genie_fast.training.distill_diffusers.distill_diffusers, not by the core run")
    check_distill_args(args)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    ckpt_path = out / "ckpt.pt"
    schedule = VPSchedule()
    if args.target == "secant":
        check_span_t(args.span_t, schedule, "--span-t")
    unet = load_unet_from_train_ckpt(args.unet_ckpt)
    for p in unet.parameters():
        p.requires_grad_(False)

    state = load_checkpoint(ckpt_path, DISTILL_KEYS) if (args.resume and ckpt_path.exists()) else None
    check_resumed_target(state, args, ckpt_path)
    init_head = None
    if state is None:
        torch.manual_seed(args.seed)
        if getattr(args, "init_head", None):
            from ..models.default import load_model
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
    x_train = fit_images(x_train, unet.config)  # a cascade's base model: the images average-pooled
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step + 7)
    num_classes = unet.config.num_classes
    make_cond, aug_max = None, None
    if unet.config.low_res_size:
        aug_max = check_aug_max(getattr(args, "aug_max", DEFAULT_AUG_MAX))
        if state is not None and state.get("aug_max", aug_max) != aug_max:
            raise ValueError(f"{ckpt_path} was distilled with --aug-max {state['aug_max']}, not {aug_max}: resume "
                             f"it with that, or start over with another --out or --overwrite")
        make_cond = lambda x0: low_res_cond(x0, unet.config, aug_max, schedule, gen)  # noqa: E731
    batches = infinite_batches(x_train, args.batch, gen, labels=y_train if num_classes else None)
    meta = {"head_config": head_cfg.to_dict(), "head_params": count_parameters(model.head),
            "unet_params": count_parameters(unet), "args": jsonable_args(args)}
    log = open_run_log(out, meta, f"# start step={step} {json.dumps(meta)}")

    def checkpoint(step, wall):
        save_checkpoint(ckpt_path, {"head_config": head_cfg.to_dict(), "head": model.head.state_dict(),
                                    "ema_head": ema_head.state_dict(), "opt": opt.state_dict(),
                                    "step": step, "wall_s": wall, "unet_ckpt": str(args.unet_ckpt),
                                    "target": args.target, "span_t": args.span_t,
                                    **({"aug_max": aug_max} if aug_max is not None else {})})

    step, wall = train_head(args, model, ema_head, opt, step, wall, batches, gen, num_classes, checkpoint, ckpt_path,
                            log, "distill", make_cond=make_cond)
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

