"""The run harness every training run shares (``genie_fast.training.unet``: the U-Net;
``genie_fast.training.distill``: the GENIE head; ``genie_fast.training.distill_diffusers``: a head for a
diffusers model).

Flags (`add_run_args`) and their checks before any work (`check_run_args`); the run folder
(``run.json``, ``log.txt``: `open_run_log`); checkpoints written atomically (`save_checkpoint`),
read back as plain data only (`load_checkpoint`, `load_state`), kept aside at ``--keep-at`` steps;
and the loop itself (`run_steps`: lr warmup, a stop on a non-finite loss, gradient clipping, the
optimiser step, EMA, logging, checkpoints).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..checks import check_int, check_number, check_out_dir

__all__ = ["TRAIN_KEYS", "DISTILL_KEYS", "add_run_args", "check_run_args", "keep_steps", "check_run_dir",
           "check_finite_loss", "jsonable_args", "open_run_log", "save_checkpoint", "load_checkpoint",
           "load_state", "ema_update", "drop_labels", "run_steps"]


def drop_labels(labels: torch.Tensor, num_classes: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each label by the null class ``num_classes`` with probability p (classifier-free guidance training)."""
    drop = torch.rand(labels.shape, generator=generator) < p
    return torch.where(drop, torch.full_like(labels, num_classes), labels)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float):
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def save_checkpoint(path: Path, state: dict):
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill mid-write never corrupts the last good checkpoint


TRAIN_KEYS = ("config", "model", "ema", "opt", "step", "wall_s")            # genie-fast train
DISTILL_KEYS = ("head_config", "head", "ema_head", "opt", "step", "wall_s")  # genie-fast distill


def load_checkpoint(path: Path, keys: tuple[str, ...] = ()) -> dict:
    """A training state written by :func:`save_checkpoint`, loaded with ``weights_only=True``
    (tensors and plain Python data only: a crafted file cannot run code). ``keys``: entries it
    must hold (`TRAIN_KEYS`, `DISTILL_KEYS`); a checkpoint of the other kind is refused by name."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a folder; give its ckpt.pt")
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupted, or holding objects that are not plain data
        raise ValueError(f"checkpoint {path} cannot be read as a genie_fast training state "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"checkpoint {path} is not a genie_fast training state (no 'step')")
    missing = [k for k in keys if k not in state]
    if missing:
        kind = "a U-Net training checkpoint (genie-fast train)" if "ema" in keys else \
            "a head distillation checkpoint (genie-fast distill)"
        raise ValueError(f"checkpoint {path} is not {kind}: it has no {', '.join(map(repr, missing))} "
                         f"(it holds {', '.join(sorted(map(str, state)))})")
    return state


def load_state(module: torch.nn.Module, state: dict, key: str, path) -> None:
    """``module.load_state_dict(state[key])`` of checkpoint ``path``: weights that do not fit the
    module, or of another dtype (never cast silently), are refused naming the file and the entry."""
    weights, ours = state[key], module.state_dict()
    if not isinstance(weights, dict):
        raise ValueError(f"checkpoint {path}: {key!r} is not a state dict ({type(weights).__name__})")
    for name, t in weights.items():
        if name in ours and isinstance(t, torch.Tensor) and t.dtype != ours[name].dtype:
            raise ValueError(f"checkpoint {path}: {key}.{name} is {t.dtype}, the network's is "
                             f"{ours[name].dtype} (not cast)")
    try:
        module.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path}: its {key!r} weights do not fit the network of its config "
                         f"({str(e).splitlines()[-1].strip()})") from None
    return None


def check_run_args(args, numbers: dict | None = None):
    """Refuse impossible settings of a train / distill run, and an unusable --out, before any work.

    numbers: extra (flag -> (value, low, high)) ranges of the caller."""
    for flag, least in (("batch", 1), ("steps", 0), ("warmup", 0), ("log_every", 1), ("threads", 1)):
        check_int("--" + flag.replace("_", "-"), getattr(args, flag), least)
    ranges = {"--lr": (args.lr, 0.0, math.inf), "--clip": (args.clip, 0.0, math.inf), "--ema": (args.ema, 0.0, 1.0),
              "--ckpt-minutes": (args.ckpt_minutes, 0.0, math.inf),
              "--label-dropout": (getattr(args, "label_dropout", 0.0), 0.0, 1.0), **(numbers or {})}
    for flag, (value, low, high) in ranges.items():
        check_number(flag, value, low, high, low_open=flag == "--clip")
    if getattr(args, "resume", False) and getattr(args, "overwrite", False):
        raise ValueError("--resume continues the run in --out, --overwrite starts it over: give one of them")
    keep_steps(args)
    out = check_out_dir(args.out, "--out")
    check_run_dir(out, args.resume, getattr(args, "overwrite", False))


def keep_steps(args) -> set[int]:
    """The steps of ``--keep-at`` (each in 1..--steps)."""
    raw = str(getattr(args, "keep_at", "") or "")
    steps = set()
    for part in filter(None, (p.strip() for p in raw.split(","))):
        if not part.isdigit() or not 1 <= int(part) <= args.steps:
            raise ValueError(f"--keep-at {raw!r}: {part!r} is not a step in 1..{args.steps} (--steps)")
        steps.add(int(part))
    return steps


def check_finite_loss(loss: float, step: int, ckpt_path: Path, saved_step: int):
    """Stop a run whose loss is NaN or inf before its update reaches the weights or a checkpoint."""
    if not math.isfinite(loss):
        kept = f"{ckpt_path} keeps step {saved_step}" if saved_step else f"nothing was saved to {ckpt_path}"
        raise FloatingPointError(f"the loss at step {step + 1} is {loss} (not finite); stopped before that "
                                 f"update ({kept}): lower --lr, or check the data and the initial weights")


def check_run_dir(out: Path, resume: bool, overwrite: bool):
    """Refuse to start a fresh run over an existing checkpoint unless --overwrite is given."""
    if (out / "ckpt.pt").exists() and not resume and not overwrite:
        raise ValueError(f"{out / 'ckpt.pt'} exists; pass --resume to continue that run or "
                         f"--overwrite to start over (its checkpoint is replaced at the first save)")


def jsonable_args(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("func", "command")}


def open_run_log(out: Path, meta: dict, first_line: str):
    """Create the run folder ``out`` (only now: a run refused earlier leaves none), write ``run.json``
    and open ``log.txt`` for appending with ``first_line``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(meta, indent=2))
    log = open(out / "log.txt", "a")
    log.write(first_line + "\n")
    return log


def run_steps(args, *, opt, step: int, wall: float, step_loss, trained, ema_pairs, checkpoint, ckpt_path: Path,
              log, desc: str) -> tuple[int, float]:
    """The loop every training run shares (train, distill, distill --diffusers), from ``step`` to ``args.steps``.

    Per step: linear lr warmup (``args.lr`` x a param group's ``lr_mult``), ``step_loss()`` ->
    (loss, {name: value} logged beside it), a stop on a non-finite loss or gradient norm, gradient
    clipping of ``trained`` at ``args.clip``, the optimiser step and EMA (``ema_pairs``: (ema, live)
    modules, decay warming up to ``args.ema``). A log line every ``args.log_every`` steps and at the
    end; ``checkpoint(step, wall)`` every ``args.ckpt_minutes``, at each ``--keep-at`` step (copied aside as
    ``ckpt_step<N>.pt``) and at the end. Returns (step, wall)."""
    trained = list(trained)
    last_ckpt, saved_step = time.time(), step
    t_seg, sums, n_acc = time.time(), {}, 0
    keep = keep_steps(args)
    bar = tqdm(total=args.steps, initial=step, desc=desc, dynamic_ncols=True)
    while step < args.steps:
        t0 = time.time()
        warmup = min(1.0, (step + 1) / max(1, args.warmup))
        for g in opt.param_groups:
            g["lr"] = args.lr * g.get("lr_mult", 1.0) * warmup
        loss, extra = step_loss()
        loss_value = loss.item()
        check_finite_loss(loss_value, step, ckpt_path, saved_step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        check_finite_loss(float(torch.nn.utils.clip_grad_norm_(trained, args.clip)), step, ckpt_path,
                          saved_step)  # an inf gradient of a finite loss would turn the weights to NaN
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))  # EMA warm-up: early checkpoints are usable too
        for ema, live in ema_pairs:
            ema_update(ema, live, decay)
        wall += time.time() - t0
        n_acc += 1
        for name, value in {"loss": loss_value, **extra}.items():
            sums[name] = sums.get(name, 0.0) + float(value)
        bar.update(1)
        if step % args.log_every == 0 or step == args.steps:
            sps = n_acc / max(time.time() - t_seg, 1e-9)
            means = {name: total / n_acc for name, total in sums.items()}
            fields = " ".join(f"{name} {v:.5f}" if name == "loss" else f"{name} {v:.4f}" for name, v in means.items())
            log.write(f"step {step} {fields} steps_per_s {sps:.3f} wall_s {wall:.0f}\n")
            log.flush()
            bar.set_postfix({name: f"{v:.4f}" for name, v in means.items()} | {"sps": f"{sps:.2f}"})
            t_seg, sums, n_acc = time.time(), {}, 0
        if step in keep or time.time() - last_ckpt > 60 * args.ckpt_minutes:
            checkpoint(step, wall)
            last_ckpt, saved_step = time.time(), step
            if step in keep:
                shutil.copyfile(ckpt_path, ckpt_path.with_name(f"ckpt_step{step}.pt"))
    checkpoint(step, wall)
    bar.close()
    return step, wall


def add_run_args(p: argparse.ArgumentParser, *, out: str, steps: int, batch: int, lr: float, warmup: int,
                 ema: float, log_every: int):
    """The flags every training run shares (train, distill): run folder, optimiser, EMA, checkpoints, log."""
    p.add_argument("--out", default=out, help="run directory (checkpoint, log)")
    p.add_argument("--steps", type=int, default=steps, help="total optimiser steps")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup", type=int, default=warmup, help="linear lr warmup steps")
    p.add_argument("--ema", type=float, default=ema)
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--ckpt-minutes", type=float, default=3.0)
    p.add_argument("--keep-at", default="", metavar="STEPS",
                   help="comma-separated steps whose checkpoint is also kept as <out>/ckpt_step<N>.pt "
                        "(states to average later: --unet-ckpt a.pt,b.pt)")
    p.add_argument("--log-every", type=int, default=log_every)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None)
    p.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt")
    p.add_argument("--overwrite", action="store_true", help="start fresh even if <out>/ckpt.pt exists")
