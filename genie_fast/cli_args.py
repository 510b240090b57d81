"""The sampling flags of the ``sample``, ``encode`` and ``generate`` commands, defined once
(`add_sampling_args`) and checked once before any model is loaded (`check_sampling_args`), with
the one label grammar of the command line (`parse_labels`)."""
from __future__ import annotations

import argparse

from .checks import check_int, check_number
from .devices import DTYPES, command_device
from .noise import check_seed
from .schedule import GRIDS
from .solvers import DEFAULT_AFS, DEFAULT_NFE, DEFAULT_SOLVER, SOLVERS

__all__ = ["LABELS_HELP", "add_sampling_args", "check_sampling_args", "parse_labels"]

LABELS_HELP = ("class-conditional models: a class (e.g. 3), a comma-separated list of classes (0,3,5), or 'all' "
               "(every class of the model; 'cycle' is the same). sample: one row of --n images per class; "
               "encode: one class for every image, or one per image; generate: seed s gets the list's class "
               "number s mod its length (all: class s mod the number of classes)")


def add_sampling_args(p: argparse.ArgumentParser, *, seed: str | None = "seed", afs: bool = True,
                      model: bool = True) -> argparse.ArgumentParser:
    """Add the sampling flags to a command's parser. seed: "seed" (a batch seed, --seed), "seeds"
    (per-image seeds, --seeds, required) or None; afs: the sampling-only --afs and --denoise (not
    for encoding); model: --model (generate adds it with --diffusers itself). Every default is
    `genie_fast.sample`'s: one set of defaults for sample(), SamplingEngine and the commands."""
    p.add_argument("--solver", default=DEFAULT_SOLVER, help=f"one of {', '.join(sorted(SOLVERS))} "
                   f"(default: {DEFAULT_SOLVER})")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--nfe", type=int, default=None,
                        help=f"network-evaluation budget per image (default: {DEFAULT_NFE})")
    budget.add_argument("--steps", type=int, default=None, help="number of steps, instead of --nfe")
    p.add_argument("--grid", default="auto", help="auto (the model's tuned grid for this run if it has one, else "
                   "the fixed grid measured best for the solver) | tuned (the tuned grid, or an error) | "
                   + " | ".join(GRIDS) + ("" if afs else " (encoding runs it reversed)"))
    if afs:
        p.add_argument("--afs", action=argparse.BooleanOptionalAction, default=None,  # sample()'s afs=None
                       help=f"analytical first step, saves one NFE (default: {'on' if DEFAULT_AFS else 'off'} "
                            "for the named grids given here, solvers.AUTO_AFS)")
        p.add_argument("--denoise", action=argparse.BooleanOptionalAction, default=False,
                       help="final denoising step (+1 NFE)")
    if seed == "seed":
        p.add_argument("--seed", type=int, default=0, help="batch seed in [0, 2**32)")
    elif seed == "seeds":
        p.add_argument("--seeds", required=True, help="seeds, e.g. 0-49999 or 0-9,100-109 (one image each)")
    p.add_argument("--labels", default=None, help=LABELS_HELP)
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance scale s, eps_u + s (eps_c - eps_u) (diffusers' convention; "
                        "with --labels or --cond; default 2 where a negative branch exists, 1 = the conditional "
                        "model alone)")
    p.add_argument("--net-dtype", default=None,
                   help="network precision, e.g. fp16, bf16, fp32 (default: fp16 on CUDA, else fp32)")
    p.add_argument("--backend", default="auto", help="fused step ops: auto | torch | cpp | triton | cuda")
    p.add_argument("--device", default=None,
                   help="cpu | cuda | cuda:N (default: CUDA when available, else the CPU; cuda:LOCAL_RANK "
                        "under torchrun)")
    if model:
        p.add_argument("--model", default=None, help="genie_fast model stem (default: the bundled model)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    return p


def parse_labels(text: str | None):
    """--labels -> None, "all" (every class, resolved against the model later; "cycle" is accepted
    for it) or a list of class indices (one or more)."""
    if text is None:
        return None
    text = str(text).strip()
    if text in ("all", "cycle"):
        return "all"
    try:
        classes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        classes = []
    if not classes:
        raise ValueError(f"--labels must be a class index (0, 1, ...), a comma-separated list of them, 'all' or "
                         f"'cycle', got {text!r}")
    return [check_int("--labels", c, 0) for c in classes]


def check_sampling_args(args):
    """Refuse bad numbers, seeds, solver, grid, precision, device, backend or labels before a model
    is loaded (one line each); returns the labels (`parse_labels`)."""
    from .ops import BACKENDS, check_backend

    for flag in ("n", "batch", "nfe", "steps"):
        if getattr(args, flag, None) is not None:
            check_int("--" + flag, getattr(args, flag), 1)
    check_int("--threads", args.threads, 0)
    if getattr(args, "seed", None) is not None:
        check_seed("--seed", args.seed)
    if args.nfe is not None and args.steps is not None:
        raise ValueError("give --nfe or --steps, not both")
    if args.solver not in SOLVERS:
        raise ValueError(f"--solver {args.solver!r} is not a solver; choose one of {sorted(SOLVERS)}")
    if args.grid not in ("auto", "tuned", *GRIDS):
        raise ValueError(f"--grid {args.grid!r} is not a grid; choose one of {('auto', 'tuned', *GRIDS)}")
    if args.net_dtype is not None and args.net_dtype not in DTYPES:
        raise ValueError(f"--net-dtype {args.net_dtype!r} is not a dtype; choose one of {sorted(DTYPES)}")
    device = command_device(args.device)
    if args.backend not in BACKENDS:
        raise ValueError(f"--backend {args.backend!r} is not a backend; choose one of {BACKENDS}")
    check_backend(args.backend, device)  # e.g. --backend cuda on the CPU: refused now, not after loading
    if args.guidance_scale is not None:
        check_number("--guidance-scale", args.guidance_scale)
    return parse_labels(args.labels)
