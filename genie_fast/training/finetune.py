"""Solver-aware fine-tuning of a distilled GENIE head, the network frozen: the head is trained so
that a head solver (`genie_multistep` by default) at a few network evaluations lands on a
high-accuracy teacher's end point from the same noise, as AMED-Plugin, LD3 and EPD train their small
learned parts against teacher trajectories. JVP distillation (`training.distill`) teaches the head
the instantaneous d eps/d gamma, which a head reading the network's features fits to about 50% on
the bundled model; this fine-tune teaches it what the solver's few large steps need instead.

    genie-fast finetune-head --out runs/head_ft --steps 600 --resume          # the bundled model
    genie-fast finetune-head --model STEM --budgets 5,10 --out DIR --resume

Per step: `--batch` training noises and one budget of `--budgets` drawn at random; the solver runs
on that budget's grid as ``sample()`` would (the model's stored tuned grid, else its fixed ``auto``
grid, AFS as ``auto``), differentiably (``backend="torch"`` under autograd: the solver's own loop,
back-propagated through the network to the head's earlier outputs); the loss is the mean
per-sample RMS error of x_0 against the teacher, divided by the starting head's median error at that
budget (so every budget's relative error counts the same). The teacher is RK4 in log gamma
(`reference.rk4_solve`, `--teacher-steps`) of the same network from the same noise, computed once
into ``<out>/teacher.pt`` in resumable chunks. Noise: `--n` samples of generator seed `--seed`;
labels (a class-conditional model, ``--labels mix``): half the null class, half drawn uniformly,
each run unguided. The run's checkpoint (``<out>/ckpt.pt``, the EMA head included) resumes with
``--resume`` and exports with ``genie-fast export --model STEM --head-ckpt <out>/ckpt.pt``.
Judge the result on other noise (bench/head_finetune.py) and re-measure the head's error: the blend
of `genie_multistep` keeps the model's ``head_error`` during the run.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from ..checks import check_int
from ..grid_store import tuned_for
from ..guidance import conditioned
from ..models.head import HeadConfig
from ..reference import rk4_solve
from ..schedule import time_grid
from ..solvers import HEAD_SOLVERS, genie, genie_multistep, resolve
from .distill import head_state
from .run import (DISTILL_KEYS, add_run_args, check_run_args, jsonable_args, load_checkpoint, open_run_log,
                  run_steps, save_checkpoint)

__all__ = ["build_parser", "teacher_endpoints", "budget_grid", "training_noise", "finetune_head"]


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model stem (STEM.safetensors + STEM.json); default: the bundled one")
    p.add_argument("--solver", default="genie_multistep", choices=HEAD_SOLVERS)
    p.add_argument("--budgets", default="5,6,8,10,15", help="NFE budgets, comma-separated (one per step, at random)")
    p.add_argument("--n", type=int, default=256, help="training noises")
    p.add_argument("--teacher-steps", type=int, default=50, help="RK4 steps of the teacher")
    p.add_argument("--labels", choices=("mix", "none"), default="mix",
                   help="mix: half null class, half uniform labels (a class-conditional model); none: no labels")
    add_run_args(p, out="runs/head_ft", steps=600, batch=8, lr=1e-4, warmup=20, ema=0.99, log_every=10)
    return p


def _budgets(text: str) -> list[int]:
    try:
        budgets = [int(b) for b in str(text).split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--budgets must be comma-separated integers, got {text!r}") from None
    if not budgets:
        raise ValueError("--budgets needs at least one NFE budget")
    for b in budgets:
        check_int("--budgets", b, 2)
    return budgets


def training_noise(model, n: int, seed: int, labels: str):
    """(noise (n, *image_shape), labels (n,) or None): generator `seed`; ``mix``: the first half null."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, *model.image_shape, generator=g)
    k = getattr(model, "num_classes", 0) or 0
    if labels == "none" or not k:
        return noise, None
    lab = torch.randint(0, k, (n,), generator=g)
    lab[: n // 2] = k
    return noise, lab


def _eps_fn(model, labels):
    return conditioned(model, labels, None if labels is None else 1.0, batch=0 if labels is None else len(labels))


def teacher_endpoints(model, noise, labels, steps: int, path: Path | None = None, chunk: int = 32, log=print):
    """x_0 (float32) of the network's ODE from `noise` at t = 1 by RK4 in log gamma (`steps` steps,
    float64 state, the network in its own dtype), unguided with `labels`. With `path`, finished chunks
    are kept there and a rerun with the same noise and steps resumes."""
    key = {"n": len(noise), "steps": steps, "noise_sum": float(noise.double().sum()),
           "labels_sum": None if labels is None else int(labels.sum())}
    done = []
    if path is not None and Path(path).exists():
        saved = torch.load(path, weights_only=True)
        if saved.get("key") == key:
            done = list(saved["x0"])
    sch = model.schedule
    dtype = next(model.parameters()).dtype
    for i in range(len(done) * chunk, len(noise), chunk):
        fn = _eps_fn(model, None if labels is None else labels[i:i + chunk])
        with torch.no_grad():
            x0 = rk4_solve(lambda x, t: fn(x.to(dtype), t.to(dtype)), noise[i:i + chunk], sch, 1.0, sch.t_end, steps)
        done.append(x0.float())
        if path is not None:
            torch.save({"key": key, "x0": done}, path)
        log(f"teacher {min(i + chunk, len(noise))}/{len(noise)}")
    return torch.cat(done)


def budget_grid(model, solver: str, nfe: int) -> tuple[torch.Tensor, bool]:
    """(times, afs) that ``sample(model, solver=solver, nfe=nfe)`` runs without labels: the model's
    stored tuned grid for that key, else the fixed ``auto`` grid."""
    opts = resolve(solver, nfe, None, "auto")
    stored = tuned_for(model, solver, nfe, None, "auto", None, False, None)
    if stored is not None:
        return stored, bool(stored.afs)
    return time_grid(model.schedule, opts.steps, opts.grid), opts.afs


def _rollout(model, solver, fn, noise, grid, head_error):
    ts, afs = grid
    kw = {"head_error": head_error} if solver == "genie_multistep" else {}
    solve = genie_multistep if solver == "genie_multistep" else genie
    return solve(fn, noise, ts, model.schedule, afs=afs, backend="torch", **kw)[0]


def _per_sample(x0, ref):
    return (x0 - ref).pow(2).flatten(1).mean(1).sqrt()


def finetune_head(args) -> Path:
    """The fine-tuning run (`build_parser`'s flags); returns its checkpoint."""
    from ..models.default import load_default, load_model

    budgets = _budgets(args.budgets)
    check_int("--n", args.n, 1)
    check_int("--teacher-steps", args.teacher_steps, 1)
    check_run_args(args)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    ckpt_path = out / "ckpt.pt"
    model = (load_model(args.model) if args.model else load_default()).float()
    if not callable(getattr(model, "eps_and_head", None)):
        raise ValueError(f"{args.model or 'the model'} has no distilled head to fine-tune")
    for p in model.parameters():
        p.requires_grad_(False)
    grids = {b: budget_grid(model, args.solver, b) for b in budgets}  # before the head changes (tuned grids)
    state = load_checkpoint(ckpt_path, DISTILL_KEYS) if (args.resume and ckpt_path.exists()) else None
    if state is not None and (state.get("budgets"), state.get("solver")) != (budgets, args.solver):
        raise ValueError(f"{ckpt_path} fine-tuned {state.get('solver')} at budgets {state.get('budgets')}: resume "
                         f"with those, or start over with another --out or --overwrite")
    for p in model.head.parameters():
        p.requires_grad_(True)
    ema_head, opt, step, wall = head_state(model, state, ckpt_path, args.lr)
    head_error = getattr(model, "head_error", None)
    meta = {"model": args.model or "bundled", "head_config": model.head.config.to_dict(), "args": jsonable_args(args),
            "grids": {b: [float(t) for t in g[0]] for b, g in grids.items()}, "head_error": head_error}
    log = open_run_log(out, meta, f"# start step={step} {json.dumps(meta)}")

    def say(line):
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    noise, labels = training_noise(model, args.n, args.seed, args.labels)
    ref = teacher_endpoints(model, noise, labels, args.teacher_steps, out / "teacher.pt", log=say)
    scales = state.get("scales") if state is not None else None
    if scales is None:  # the starting head's median error per budget on (up to) 32 training noises
        k = min(32, len(noise))
        fn = _eps_fn(model, None if labels is None else labels[:k])
        with torch.no_grad():
            scales = {b: float(_per_sample(_rollout(model, args.solver, fn, noise[:k], grids[b], head_error),
                                           ref[:k]).median()) for b in budgets}
        say(f"# starting error per budget: {json.dumps(scales)}")
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step + 11)

    def step_loss():
        idx = torch.randperm(len(noise), generator=gen)[: args.batch]
        b = budgets[int(torch.randint(len(budgets), (1,), generator=gen))]
        fn = _eps_fn(model, None if labels is None else labels[idx])
        with torch.enable_grad():
            err = _per_sample(_rollout(model, args.solver, fn, noise[idx], grids[b], head_error), ref[idx])
        return err.mean() / scales[b], {"rel": float(err.detach().median()) / scales[b]}

    def checkpoint(step, wall):
        save_checkpoint(ckpt_path, {"head_config": model.head.config.to_dict(), "head": model.head.state_dict(),
                                    "ema_head": ema_head.state_dict(), "opt": opt.state_dict(), "step": step,
                                    "wall_s": wall, "model": args.model or "bundled", "solver": args.solver,
                                    "budgets": budgets, "scales": scales, "head_error": head_error})

    step, wall = run_steps(args, opt=opt, step=step, wall=wall, step_loss=step_loss, trained=model.head.parameters(),
                           ema_pairs=[(ema_head, model.head)], checkpoint=checkpoint, ckpt_path=ckpt_path, log=log,
                           desc="finetune-head")
    log.write(f"# done step={step} wall_s={wall:.0f}\n")
    log.close()
    return ckpt_path


def head_from_ckpt(model, ckpt, use_ema: bool = True):
    """`model` with the head of fine-tuning checkpoint `ckpt` (its EMA weights by default), in place."""
    state = load_checkpoint(Path(ckpt), ("head_config", "ema_head" if use_ema else "head"))
    if HeadConfig.from_dict(state["head_config"]).to_dict() != model.head.config.to_dict():
        raise ValueError(f"{ckpt}: its head config differs from the model's head")
    model.head.load_state_dict(state["ema_head" if use_ema else "head"])
    return model


def main(argv=None):
    finetune_head(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
