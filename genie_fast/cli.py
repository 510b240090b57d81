"""``genie-fast`` command line: ``train``, ``distill``, ``export``, ``sample``, ``generate``.

    genie-fast train   --out runs/fmnist --steps 8000 --resume
    genie-fast distill --unet-ckpt runs/fmnist/ckpt.pt --out runs/distill --steps 2000 --resume
    genie-fast export  --unet-ckpt runs/fmnist/ckpt.pt --head-ckpt runs/distill/ckpt.pt --out model
    genie-fast sample  --n 64 --nfe 10 --out grid.png [--model STEM] [--solver genie]
    genie-fast generate --seeds 0-49999 --outdir out/fid [--batch 64 --nfe 10]   (also under torchrun)
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, pad: int = 2) -> Path:
    """Write images (N, C, H, W) in [-1, 1] (C = 1 or 3) as one PNG grid."""
    import matplotlib.image

    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, c, h, w = x.shape
    if c not in (1, 3):
        raise ValueError(f"save_grid needs 1 or 3 channels, got {c}")
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        tile = x[i].permute(1, 2, 0).numpy()
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = tile
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    matplotlib.image.imsave(str(path), grid)
    return path


def _cmd_train(args):
    from .train import train
    train(args)


def _cmd_distill(args):
    from .distill import distill
    distill(args)


def _cmd_export(args):
    from .checks import check_out_dir
    from .distill import model_from_ckpts
    from .models.default import _stem, save_model
    import json

    stem = _stem(args.out)
    if stem.is_dir():
        raise ValueError(f"--out {args.out} is a folder; give a stem such as {stem / 'model'} "
                         f"(writes model.safetensors and model.json in it)")
    check_out_dir(stem.parent, "--out")
    existing = [f for f in (Path(f"{stem}.safetensors"), Path(f"{stem}.json")) if f.exists()]
    if existing and not args.overwrite:
        raise ValueError(f"{existing[0]} exists; pass --overwrite to replace it")
    try:
        prov = json.loads(args.provenance) if args.provenance else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"--provenance is not valid JSON ({e}): {args.provenance!r}") from None
    if not isinstance(prov, dict):
        raise ValueError(f"--provenance must be a JSON object, got {args.provenance!r}")
    model = model_from_ckpts(args.unet_ckpt, args.head_ckpt)
    stem = save_model(model, args.out, provenance=prov)
    print(f"wrote {stem}.safetensors and {stem}.json")


def _cmd_sample(args):
    import genie_fast
    from .models.default import load_model

    torch.set_num_threads(args.threads) if args.threads else None
    model = load_model(args.model) if args.model else None
    x0, nfe = genie_fast.sample(model=model, n=args.n, solver=args.solver, nfe=args.nfe, steps=args.steps,
                                seed=args.seed, grid=args.grid, afs=args.afs, denoise=args.denoise,
                                backend=args.backend, device=args.device, net_dtype=args.net_dtype)
    out = save_grid(x0, args.out)
    print(f"wrote {out} ({args.n} samples, solver {args.solver}, {nfe} NFE)")


def _cmd_generate(args):
    from .generate import run
    run(args)


def build_parser() -> argparse.ArgumentParser:
    from . import distill as distill_mod, generate as generate_mod, train as train_mod

    p = argparse.ArgumentParser(prog="genie-fast", description="GENIE diffusion sampling")
    sub = p.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train the score network on Fashion-MNIST")
    train_mod.build_parser(tr).set_defaults(func=_cmd_train)
    di = sub.add_parser("distill", help="distil the GENIE head from exact JVPs")
    distill_mod.build_parser(di).set_defaults(func=_cmd_distill)
    ex = sub.add_parser("export", help="write a safetensors + JSON model from checkpoints")
    ex.add_argument("--unet-ckpt", required=True)
    ex.add_argument("--head-ckpt", required=True)
    ex.add_argument("--out", required=True, help="output stem (writes STEM.safetensors, STEM.json)")
    ex.add_argument("--provenance", default=None, help="JSON object stored in the config")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing STEM.safetensors / STEM.json")
    ex.set_defaults(func=_cmd_export)
    sa = sub.add_parser("sample", help="sample a PNG grid (default: the bundled model)")
    # every default is genie_fast.sample's (one set of defaults for sample(), SamplingEngine, the CLI)
    from .solvers import DEFAULT_AFS, DEFAULT_SOLVER, SOLVERS
    sa.add_argument("--n", type=int, default=64)
    sa.add_argument("--solver", default=DEFAULT_SOLVER, choices=sorted(SOLVERS))
    budget = sa.add_mutually_exclusive_group()
    budget.add_argument("--nfe", type=int, default=None, help="network-evaluation budget (default: 10)")
    budget.add_argument("--steps", type=int, default=None, help="number of steps, instead of --nfe")
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--grid", default="auto",
                    help="auto (the grid measured best for the solver) | uniform | quadratic | logsnr | edm")
    sa.add_argument("--afs", action=argparse.BooleanOptionalAction, default=DEFAULT_AFS,
                    help="analytical first step, saves one NFE (default: on)")
    sa.add_argument("--denoise", action=argparse.BooleanOptionalAction, default=False,
                    help="final denoising step (+1 NFE)")
    sa.add_argument("--net-dtype", default=None,
                    help="network precision, e.g. fp16, bf16, fp32 (default: fp16 on CUDA, else fp32)")
    sa.add_argument("--backend", default="auto", help="auto | torch | cpp | triton | cuda")
    sa.add_argument("--device", default=None, help="e.g. cuda (default: the model's device)")
    sa.add_argument("--model", default=None, help="model stem (default: bundled Fashion-MNIST model)")
    sa.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    sa.add_argument("--out", default="grid.png")
    sa.set_defaults(func=_cmd_sample)
    ge = sub.add_parser("generate", help="one image per seed, sharded over torchrun ranks, resumable (FID sets)")
    generate_mod.build_parser(ge).set_defaults(func=_cmd_generate)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (OSError, ValueError, FloatingPointError) as e:
        # a bad argument, file or place (ModelFileError is a ValueError), a run gone non-finite:
        # one line naming it, as argparse does for its own errors
        print(f"genie-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
