"""``python -m genie_fast.train``: train the U-Net (`genie_fast.training.unet`).

The names this module had stay importable from it: the run harness now lives in
`genie_fast.training.run`, U-Net training in `genie_fast.training.unet`.

    python -m genie_fast.train --out runs/fmnist --steps 8000 --resume
"""
from __future__ import annotations

from .data import load_fashion_mnist  # noqa: F401  (a name of this module before; tests patch it)
from .training.run import (DISTILL_KEYS, TRAIN_KEYS, add_run_args, check_finite_loss, check_run_args,  # noqa: F401
                           check_run_dir, drop_labels, ema_update, jsonable_args, keep_steps, load_checkpoint,
                           load_state, open_run_log, run_steps, save_checkpoint)
from .training.unet import (build_parser, diffusion_loss, init_from_checkpoint, init_from_model,  # noqa: F401
                            load_null_teacher, main, null_teacher_loss, train)

if __name__ == "__main__":
    main()
