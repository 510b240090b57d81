"""The cascade on the command line (issue 32): ``genie-fast sample --cascade [FILE]`` (both stages,
each with its own solver, budget, grid and guidance) and ``genie-fast cascade`` (write a cascade
file naming two exported models).

    genie-fast sample --cascade my.cascade.json --n 16 --nfe 10 --sr-nfe 10 --out cascade.png --pairs
    genie-fast cascade --base runs/fmnist16_genie --upsampler runs/fmnist_sr_genie --out runs/fmnist

The base stage takes the sampling flags of ``sample`` (--solver, --nfe / --steps, --grid,
--guidance-scale); the upsampler its own --sr-* flags (default: the same solver, the sample()
defaults otherwise); --afs / --denoise, --labels, --device, --net-dtype and --backend apply to both.
"""
from __future__ import annotations

import argparse
import json

from .checks import check_int, check_json_object, check_number, check_out_file

__all__ = ["SR_FLAGS", "add_cascade_args", "check_cascade_args", "stage_options", "add_bundle_args", "bundle"]

# The upsampler's flags (dest names): refused without --cascade.
SR_FLAGS = ("sr_solver", "sr_nfe", "sr_steps", "sr_grid", "sr_guidance_scale", "aug_level", "low_res_out", "pairs")


def add_cascade_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``sample --cascade``."""
    p.add_argument("--cascade", nargs="?", const="", default=None, metavar="FILE",
                   help="sample a cascade: a base model, then an upsampler conditioned on its samples (FILE: a "
                        "NAME.cascade.json; no FILE: the bundled cascade). The base stage takes --solver, --nfe, "
                        "--steps, --grid, --guidance-scale; the upsampler the --sr-* flags")
    p.add_argument("--sr-solver", default=None, help="the upsampler's solver (default: --solver)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--sr-nfe", type=int, default=None, help="the upsampler's NFE budget (default: 10)")
    budget.add_argument("--sr-steps", type=int, default=None, help="the upsampler's steps, instead of --sr-nfe")
    p.add_argument("--sr-grid", default=None, help="the upsampler's grid (default: auto)")
    p.add_argument("--sr-guidance-scale", type=float, default=None,
                   help="the upsampler's guidance scale with --labels (default 2; 1: conditional only)")
    p.add_argument("--aug-level", type=float, default=None,
                   help="noise level (VP time in [0, 1]) of the base samples the upsampler sees (default: the "
                        "cascade file's)")
    p.add_argument("--low-res-out", default=None, metavar="PNG", help="also write the base samples to this PNG")
    p.add_argument("--pairs", action="store_true",
                   help="--out shows each base sample (enlarged, nearest) beside its upsampled result")
    return p


def check_cascade_args(args):
    """Refuse the upsampler's flags without --cascade, and --cascade with --model, before any work."""
    if args.cascade is None:
        given = [f for f in SR_FLAGS if getattr(args, f, None) not in (None, False)]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} is a flag of the cascade's upsampler: it needs "
                             f"--cascade")
        return
    if args.model is not None:
        raise ValueError("--cascade names its two models itself: give --cascade FILE or --model STEM, not both")
    for flag in ("sr_nfe", "sr_steps"):
        if getattr(args, flag) is not None:
            check_int("--" + flag.replace("_", "-"), getattr(args, flag), 1)
    if args.sr_guidance_scale is not None:
        check_number("--sr-guidance-scale", args.sr_guidance_scale)
    if args.aug_level is not None:
        check_number("--aug-level", args.aug_level, 0.0, 1.0)
    from .schedule import GRIDS
    from .solvers import SOLVERS
    if args.sr_solver is not None and args.sr_solver not in SOLVERS:
        raise ValueError(f"--sr-solver {args.sr_solver!r} is not a solver; choose one of {sorted(SOLVERS)}")
    if args.sr_grid is not None and args.sr_grid not in ("auto", "tuned", *GRIDS):
        raise ValueError(f"--sr-grid {args.sr_grid!r} is not a grid; choose one of {('auto', 'tuned', *GRIDS)}")
    if args.low_res_out:
        check_out_file(args.low_res_out, (".png",), "--low-res-out")


def stage_options(args) -> tuple[dict, dict]:
    """(base, upsampler) options of `genie_fast.sample_cascade` from the flags."""
    shared = {"afs": args.afs, "denoise": args.denoise}
    base = {"solver": args.solver, "nfe": args.nfe, "steps": args.steps, "grid": args.grid,
            "guidance_scale": args.guidance_scale, **shared}
    up = {"solver": args.sr_solver or args.solver, "nfe": args.sr_nfe, "steps": args.sr_steps,
          "grid": args.sr_grid or "auto", "guidance_scale": args.sr_guidance_scale, **shared}
    return base, up


def add_bundle_args(p: argparse.ArgumentParser):
    p.add_argument("--base", required=True, help="the base model's stem (STEM.safetensors + STEM.json)")
    p.add_argument("--upsampler", required=True, help="the super-resolution model's stem")
    p.add_argument("--out", required=True, help="the cascade file: NAME (writes NAME.cascade.json) or a .json path")
    p.add_argument("--aug-level", type=float, default=None,
                   help="the default noise level of the base samples the upsampler sees (VP time; default 0.05)")
    p.add_argument("--provenance", default=None, help="JSON object stored in the file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cascade file")


def bundle(args):
    """``genie-fast cascade``: check that the two models fit, and write the cascade file."""
    from .cascade import DEFAULT_AUG_LEVEL, cascade_path, save_cascade

    out = cascade_path(args.out)
    check_out_file(out, (".json",), "--out")
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    prov = check_json_object("--provenance", args.provenance)
    level = DEFAULT_AUG_LEVEL if args.aug_level is None else check_number("--aug-level", args.aug_level, 0.0, 1.0)
    path = save_cascade(out, args.base, args.upsampler, level, prov)
    print(f"wrote {path} (base {args.base}, upsampler {args.upsampler}, aug level {level:g})")
