"""``genie-fast`` command line: ``train``, ``distill``, ``finetune-head``, ``export``, ``sample``, ``encode``, ``generate``,
``tune-grid``, ``cascade``.

    genie-fast train   --out runs/fmnist --steps 8000 --resume
    genie-fast distill --unet-ckpt runs/fmnist/ckpt.pt --out runs/distill --steps 2000 --resume
    genie-fast export  --unet-ckpt runs/fmnist/ckpt.pt --head-ckpt runs/distill/ckpt.pt --out model
    genie-fast finetune-head --out runs/head_ft --steps 600 --resume   (then export --model bundled --head-ckpt)
    genie-fast sample  --n 64 --out grid.png [--model STEM] [--solver genie] [--nfe 10 | --steps 5]
    genie-fast sample  --labels 0,3,5 --guidance-scale 2 --n 8 --out classes.png    (one row per class)
    genie-fast encode  --test-index 0,1,2 --steps 20 --out latents.safetensors --reconstruct recon.png
    genie-fast generate --seeds 0-49999 --outdir out/fid [--batch 64 --nfe 10]   (also under torchrun)
    genie-fast tune-grid --solver unipc --nfe 5 [--labels cycle --guidance-scale 2]   (STEM.grids.json)
    genie-fast cascade --base STEM16 --upsampler STEM_SR --out NAME                   (NAME.cascade.json)
    genie-fast sample  --cascade NAME.cascade.json --nfe 10 --sr-nfe 10 --n 16 --pairs --out cascade.png
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

from .checks import MissingExtra, require
from .files import png_bytes, read_png, to_uint8

# What each command needs beyond the core dependencies (pyproject.toml's extras), checked before any
# work: a missing one is refused in one line naming the extra to install.
#   train, distill, export, encode --test-index (no --reconstruct), generate --format npz: core
#   sample (a PNG grid), encode --images / --reconstruct, generate --format png: genie_fast[images]
#   distill --diffusers, generate --diffusers: genie_fast[diffusers]; --backend triton: genie_fast[triton]


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, pad: int = 2) -> Path:
    """Write images (N, C, H, W) in [-1, 1] (C = 1 or 3) as one PNG grid (RGB; needs genie_fast[images])."""
    n, c, h, w = images.shape
    if c not in (1, 3):
        raise ValueError(f"save_grid needs 1 or 3 channels, got {c}")
    x = to_uint8(images)  # (N, H, W, C)
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        tile = x[i]
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = tile
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(grid))
    return path


def _cmd_train(args):
    from .train import train
    train(args)


def _cmd_distill(args):
    from .distill import distill
    distill(args)


def _cmd_export(args):
    from .checks import check_json_object, check_out_dir
    from .distill import model_from_ckpts
    from .models.default import _check_head_error, _stem, save_model

    stem = _stem(args.out)
    if stem.is_dir():
        raise ValueError(f"--out {args.out} is a folder; give a stem such as {stem / 'model'} "
                         f"(writes model.safetensors and model.json in it)")
    check_out_dir(stem.parent, "--out")
    existing = [f for f in (Path(f"{stem}.safetensors"), Path(f"{stem}.json")) if f.exists()]
    if existing and not args.overwrite:
        raise ValueError(f"{existing[0]} exists; pass --overwrite to replace it")
    prov = check_json_object("--provenance", args.provenance)
    if (args.unet_ckpt is None) == (args.model is None):
        raise ValueError("give --unet-ckpt (a training run's network) or --model (a model file's network, e.g. "
                         "for a head from finetune-head), not both or neither")
    if args.model is not None:
        from .models.default import load_default, load_model
        from .training.finetune import head_from_ckpt
        model = head_from_ckpt(load_default() if args.model == "bundled" else load_model(args.model), args.head_ckpt)
        prov = {**(getattr(model, "provenance", None) or {}), **(prov or {})}  # the network's record kept
    else:
        model = model_from_ckpts(args.unet_ckpt, args.head_ckpt)
    if args.head_error is not None:
        model.head_error = _check_head_error(args.head_error, "--head-error")
    stem = save_model(model, args.out, provenance=prov)
    print(f"wrote {stem}.safetensors and {stem}.json")


def _cmd_sample(args):
    import genie_fast
    from .checks import check_out_file
    from .cli_args import check_sampling_args
    from .devices import command_device
    from .models.default import load_default, load_model

    from .cli_cascade import check_cascade_args

    labels = check_sampling_args(args)
    check_cascade_args(args)
    check_out_file(args.out, (".png",), "--out")
    require("PIL.Image", "genie-fast sample (it writes a PNG grid)")
    torch.set_num_threads(args.threads) if args.threads else None
    if args.cascade is not None:
        return _sample_cascade(args, labels)
    model = load_model(args.model) if args.model else (load_default() if labels else None)
    if labels == "all":
        labels = list(range(getattr(model, "num_classes", 0) or 0)) or [0]
    nrow = None
    if labels is not None:  # one row of --n samples per class
        nrow, labels = args.n, torch.tensor(labels).repeat_interleave(args.n)
    x0, nfe = genie_fast.sample(model=model, n=args.n if labels is None else len(labels), solver=args.solver,
                                nfe=args.nfe, steps=args.steps, seed=args.seed, grid=args.grid, afs=args.afs,
                                denoise=args.denoise, backend=args.backend, device=command_device(args.device),
                                net_dtype=args.net_dtype, labels=labels, guidance_scale=args.guidance_scale)
    out = save_grid(x0, args.out, nrow=nrow)
    what = "" if labels is None else f", labels {args.labels}, guidance scale {args.guidance_scale or 'default'}"
    print(f"wrote {out} ({len(x0)} samples, solver {args.solver}, {nfe} NFE per sample{what})")


def _sample_cascade(args, labels):
    """``sample --cascade``: both stages (`genie_fast.sample_cascade`), one PNG grid (and the base samples')."""
    import genie_fast
    from .cascade import load_cascade
    from .cli_cascade import stage_options
    from .devices import command_device

    cascade = load_cascade(args.cascade or None)
    if labels == "all":
        labels = list(range(getattr(cascade.base, "num_classes", 0) or 0)) or [0]
    nrow = None
    if labels is not None:  # one row of --n samples per class
        nrow, labels = args.n, torch.tensor(labels).repeat_interleave(args.n)
    base, up = stage_options(args)
    x, nfe, low = genie_fast.sample_cascade(
        cascade, n=args.n if labels is None else len(labels), seed=args.seed, labels=labels, aug_level=args.aug_level,
        base=base, upsampler=up, device=command_device(args.device), backend=args.backend, net_dtype=args.net_dtype,
        return_low_res=True)
    x, low = x.float().cpu(), low.float().cpu()
    shown, cols = x, nrow
    if args.pairs:  # each base sample (nearest-enlarged) beside its upsampled result
        big = torch.nn.functional.interpolate(low, size=x.shape[-2:], mode="nearest")
        shown = torch.stack([big, x], dim=1).flatten(0, 1)
        cols = 2 * (nrow or int(math.ceil(math.sqrt(len(x)))))
    out = save_grid(shown, args.out, nrow=cols)
    if args.low_res_out:
        save_grid(low, args.low_res_out, nrow=nrow)
    print(f"wrote {out} ({len(x)} samples of {cascade.path or 'the cascade'}, base {base['solver']} + upsampler "
          f"{up['solver']}, {nfe} NFE per sample for both stages, aug level "
          f"{cascade.aug_level if args.aug_level is None else args.aug_level:g})"
          + (f"; base samples in {args.low_res_out}" if args.low_res_out else ""))


def _load_images(args, image_shape) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The images to encode, in the model's range [-1, 1]: PNG files, or Fashion-MNIST test images by index."""
    from .data import load_fashion_mnist, to_model_range

    if bool(args.images) == bool(args.test_index):
        raise ValueError("give the images to encode: --images a.png [b.png ...] or --test-index 0,1,2")
    if args.test_index:
        x, y = load_fashion_mnist("test")
        try:
            idx = [int(v) for v in args.test_index.split(",")]
        except ValueError:
            raise ValueError(f"--test-index must be comma-separated integers, got {args.test_index!r}") from None
        bad = [i for i in idx if not 0 <= i < len(x)]
        if bad:
            raise ValueError(f"--test-index {bad} outside the test set's 0..{len(x) - 1}")
        return x[idx], y[idx]
    imgs = []
    for path in args.images:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--images: no file {path}")
        a = read_png(path, "L")  # grey (the bundled model has one channel)
        x = to_model_range(a[None], pad_to=image_shape[-1])
        if tuple(x.shape[1:]) != tuple(image_shape):
            raise ValueError(f"{path}: image {tuple(a.shape)} does not fit the model's {tuple(image_shape)}")
        imgs.append(x)
    return torch.cat(imgs), None


def _cmd_encode(args):
    import genie_fast
    from safetensors.torch import save_file
    from .checks import check_out_file
    from .cli_args import check_sampling_args
    from .devices import command_device
    from .models.default import load_default, load_model

    labels = check_sampling_args(args)
    out = check_out_file(args.out, (".safetensors",), "--out")
    if args.reconstruct:
        check_out_file(args.reconstruct, (".png",), "--reconstruct")
    if args.images or args.reconstruct:
        require("PIL.Image", "genie-fast encode --images / --reconstruct (PNG files)")
    torch.set_num_threads(args.threads) if args.threads else None
    model = load_model(args.model) if args.model else load_default()
    x0, true_labels = _load_images(args, model.image_shape)
    if labels == "all":
        raise ValueError(f"--labels {args.labels} is for sampling; give one class or one per image")
    if labels is not None:
        labels = torch.tensor(labels if len(labels) > 1 else labels * len(x0))
    kw = dict(solver=args.solver, nfe=args.nfe, steps=args.steps, grid=args.grid, labels=labels,
              guidance_scale=args.guidance_scale, net_dtype=args.net_dtype, device=command_device(args.device),
              backend=args.backend)
    x_T, nfe = genie_fast.encode(model, x0, **kw)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"solver": args.solver, "nfe": str(nfe), "grid": str(args.grid), "steps": str(args.steps),
            "labels": "" if labels is None else ",".join(map(str, labels.tolist()))}
    save_file({"latents": x_T.float().cpu().contiguous()}, str(out), metadata=meta)
    msg = f"wrote {out} ({len(x0)} latents, solver {args.solver}, {nfe} NFE per image)"
    if args.reconstruct:
        back, _ = genie_fast.sample(model, noise=x_T, afs=False, **kw)
        err = float((back.float().cpu() - x0).pow(2).mean().sqrt())
        save_grid(torch.cat([x0, back.float().cpu()]), args.reconstruct, nrow=len(x0))
        msg += f"; reconstruction (top: input, bottom: decoded) in {args.reconstruct}, RMSE {err:.4f}"
    print(msg)


def _cmd_generate(args):
    from .generate import run
    run(args)


def _cmd_tune_grid(args):
    from .checks import check_int
    from .cli_args import parse_labels
    from .generate import load_for_generate
    from .grid_store import grids_path, save_tuned_grid
    from .tuning import tune_grid

    for flag in ("n", "nfe", "steps", "fine", "max_evals"):
        if getattr(args, flag) is not None:
            check_int("--" + flag.replace("_", "-"), getattr(args, flag), 1)
    check_int("--seed", args.seed, 0)
    check_int("--threads", args.threads, 0)
    labels = parse_labels(args.labels)
    if args.guidance_scale is not None and labels is None:
        raise ValueError("--guidance-scale needs --labels (a guided grid is tuned with labels: --labels cycle)")
    torch.set_num_threads(args.threads) if args.threads else None
    if args.diffusers:
        require("diffusers", "genie-fast tune-grid --diffusers")
    model, _ = load_for_generate(args.model, args.diffusers)
    out = Path(args.out) if args.out else grids_path(model)
    if labels is not None:  # every label in turn over the n tuning noises: one grid for all labels
        classes = list(range(int(getattr(model, "num_classes", 0) or 0))) if labels == "all" else labels
        if not classes:
            raise ValueError("--labels was given but the model is not class-conditional")
        labels = torch.tensor(classes).repeat(args.n // len(classes) + 1)[:args.n]
    scale = None if labels is None else (2.0 if args.guidance_scale is None else args.guidance_scale)
    grid = tune_grid(model, args.solver, args.nfe, args.steps, n=args.n, seed=args.seed, labels=labels,
                     guidance_scale=scale, afs=args.afs, method=args.method, fine=args.fine, max_evals=args.max_evals)
    grid.info["tuned"]["labels"] = "none" if labels is None else args.labels
    path = save_tuned_grid(model, grid, args.solver, guidance_scale=scale, path=out, info=grid.info)
    print(f"wrote {path}: {args.solver}, {len(grid) - 1} steps (afs={grid.afs}), "
          f"{'no labels' if scale is None else f'guidance {scale:g}'}: {[round(float(t), 5) for t in grid]}")


def _train_args(p):
    from . import train
    train.build_parser(p)


def _distill_args(p):
    from . import distill
    distill.build_parser(p)


def _export_args(p):
    p.add_argument("--unet-ckpt", default=None,
                   help="training checkpoint (EMA weights); several, comma-separated: their average")
    p.add_argument("--model", default=None, help="instead of --unet-ckpt: the network (and schedule) of this model "
                   "file, 'bundled' for the bundled one (a head from finetune-head)")
    p.add_argument("--head-ckpt", required=True)
    p.add_argument("--out", required=True, help="output stem (writes STEM.safetensors, STEM.json)")
    p.add_argument("--provenance", default=None, help="JSON object stored in the config")
    p.add_argument("--head-error", type=float, default=None,
                   help="the head's measured relative error (pooled, gamma-weighted, against the exact JVP: "
                        "bench/bench_quality.py's head fidelity), stored as head_error; genie_multistep's blend "
                        "reads it (unset: its default)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing STEM.safetensors / STEM.json")


def _finetune_args(p):
    from .training import finetune
    finetune.build_parser(p)


def _cmd_finetune(args):
    from .training.finetune import finetune_head
    finetune_head(args)


def _sample_args(p):
    from .cli_args import add_sampling_args
    from .cli_cascade import add_cascade_args
    p.add_argument("--n", type=int, default=64, help="images (per class with --labels)")
    add_sampling_args(p)
    p.add_argument("--out", default="grid.png")
    add_cascade_args(p)


def _cascade_args(p):
    from .cli_cascade import add_bundle_args
    add_bundle_args(p)


def _cmd_cascade(args):
    from .cli_cascade import bundle
    bundle(args)


def _encode_args(p):
    from .cli_args import add_sampling_args
    p.add_argument("--images", nargs="+", default=None, help="PNG files (grey, the model's size or 28x28)")
    p.add_argument("--test-index", default=None, help="Fashion-MNIST test images by index, e.g. 0,1,2")
    p.add_argument("--out", default="latents.safetensors", help="latents (tensor 'latents') as safetensors")
    p.add_argument("--reconstruct", default=None, metavar="PNG",
                   help="also decode the latents with the same solver and grid (AFS off) and write input "
                        "and reconstruction rows to this PNG")
    add_sampling_args(p, seed=None, afs=False)


def _generate_args(p):
    from . import generate
    generate.build_parser(p)


def _tune_grid_args(p):
    from .solvers import DEFAULT_NFE, DEFAULT_SOLVER
    p.add_argument("--solver", default=DEFAULT_SOLVER, help=f"default: {DEFAULT_SOLVER}")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--nfe", type=int, default=None, help=f"network-evaluation budget (default {DEFAULT_NFE})")
    budget.add_argument("--steps", type=int, default=None, help="number of steps, instead of --nfe")
    p.add_argument("--afs", action=argparse.BooleanOptionalAction, default=None, help="analytical first step "
                   "(default on)")
    p.add_argument("--labels", default=None, help="tune for runs with labels: 'cycle' (every class in turn: one grid "
                   "for all labels) or classes 0,3,5; default: no labels (the null class)")
    p.add_argument("--guidance-scale", type=float, default=None, help="with --labels (default 2)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="genie_fast model stem (default: the bundled model)")
    src.add_argument("--diffusers", default=None, metavar="DIR", help="a diffusers UNet folder")
    p.add_argument("--out", default=None, help="grids file (default: beside the model, STEM.grids.json)")
    p.add_argument("--n", type=int, default=128, help="tuning noises (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tuning noises")
    p.add_argument("--method", default="search", choices=("search", "dp"), help="default: search")
    p.add_argument("--fine", type=int, default=32, help="steps of each fine candidate grid (default 32)")
    p.add_argument("--max-evals", type=int, default=60, help="solver runs of the search (default 60)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")


# command -> (help, the function adding its flags, the function running it). A command's flags (and the
# modules behind them: training, distillation, generate) are built only when that command runs.
COMMANDS = {
    "train": ("train the score network on Fashion-MNIST", _train_args, _cmd_train),
    "distill": ("distil the GENIE head (target: exact JVPs, or secants along the ODE)", _distill_args, _cmd_distill),
    "finetune-head": ("fine-tune a model's head so its solver lands on a teacher's end points (network frozen)",
                      _finetune_args, _cmd_finetune),
    "export": ("write a safetensors + JSON model from checkpoints", _export_args, _cmd_export),
    "sample": ("sample a PNG grid (default: the bundled model)", _sample_args, _cmd_sample),
    "encode": ("images -> latents by the probability-flow ODE (t_end -> 1)", _encode_args, _cmd_encode),
    "generate": ("one image per seed, sharded over torchrun ranks, resumable (FID sets)", _generate_args,
                 _cmd_generate),
    "tune-grid": ("tune a time grid for a solver and budget; store it beside the model", _tune_grid_args,
                  _cmd_tune_grid),
    "cascade": ("write a cascade file: a base model and an upsampler conditioned on its samples", _cascade_args,
                _cmd_cascade),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command (command=None), or of every command's name but only `command`'s flags
    (what `main` builds: a command imports only what it needs)."""
    p = argparse.ArgumentParser(prog="genie-fast", description="GENIE diffusion sampling")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (text, add_args, run) in COMMANDS.items():
        sp = sub.add_parser(name, help=text)
        if command is None or name == command:
            add_args(sp)
        sp.set_defaults(func=run)
    return p


def main(argv=None):
    from .distributed import RankFailed

    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    try:
        args.func(args)
    except RankFailed as e:  # another torchrun rank failed and printed its error: one line here
        print(f"genie-fast {args.command}: stopped: {e}", file=sys.stderr)
        return 1
    except MissingExtra as e:  # an optional dependency this command needs: one line naming the extra
        print(f"genie-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError, FloatingPointError) as e:
        # a bad argument, file or place (ModelFileError is a ValueError), a run gone non-finite:
        # one line naming it, as argparse does for its own errors
        print(f"genie-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
