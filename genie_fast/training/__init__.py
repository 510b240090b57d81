"""Training: the score network and the GENIE head.

* `genie_fast.training.run`: the run harness every training run shares (flags, checks, run
  folder, checkpoints, the step loop `run_steps`);
* `genie_fast.training.unet`: U-Net training on Fashion-MNIST (``python -m genie_fast.train``);
* `genie_fast.training.distill`: the distillation core, the head learning d eps/d gamma of a
  frozen genie_fast U-Net (``python -m genie_fast.distill``);
* `genie_fast.training.distill_diffusers`: a head for a diffusers UNet2DModel
  (``distill --diffusers DIR``), built on the core.

The core never imports the diffusers front-end: the command line (``genie_fast.distill``, the
entry of ``python -m genie_fast.distill`` and ``genie-fast distill``) adds the ``--diffusers``
flags and dispatches. ``genie_fast.train``, ``genie_fast.distill`` and
``genie_fast.distill_diffusers`` keep every name they had.
"""
