"""``python -m genie_fast.distill`` and ``genie-fast distill``: distil the GENIE head.

The command line of the distillation runs: the flags of the core (`genie_fast.training.distill`,
genie_fast's own U-Net) and of ``--diffusers DIR`` (`genie_fast.training.distill_diffusers`), and
the dispatch between them. The names this module had stay importable from it.

    python -m genie_fast.distill --unet-ckpt runs/fmnist/ckpt.pt --out runs/distill --steps 2000 --resume
    python -m genie_fast.distill --diffusers my_model --out my_model/genie_distill --steps 2000
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .schedule import ode_tangents  # noqa: F401  (a name of this module before; benchmarks import it)
from .training import distill as _core
from .training.distill import (DEFAULT_SPAN_T, TARGETS, check_distill_args, check_resumed_target,  # noqa: F401
                               check_span_t, distill_target, head_loss, head_state, jvp_deps,
                               load_unet_from_train_ckpt, model_from_ckpts, sample_xt, secant_deps,
                               secant_times, train_head, with_trained_unet)
from .training.distill_diffusers import add_diffusers_args, distill_diffusers


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The flags of ``distill``: the core's, then those of ``--diffusers``."""
    p = _core.build_parser(p)
    add_diffusers_args(p)
    return p


def distill(args) -> Path:
    """A diffusers model (``--diffusers DIR``: its own data and head format) or genie_fast's own U-Net."""
    if getattr(args, "diffusers", None):
        return distill_diffusers(args)
    return _core.distill(args)


def main(argv=None):
    distill(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
