"""Distil a GENIE head for a diffusers UNet2DModel: ``genie-fast distill --diffusers DIR``.

Moved to `genie_fast.training.distill_diffusers`; its names stay importable from here.
"""
from __future__ import annotations

from .training.distill_diffusers import (DIFFUSERS_TARGET, IMAGE_SUFFIXES, add_diffusers_args,  # noqa: F401
                                         distill_diffusers, load_images, model_pool)

__all__ = ["add_diffusers_args", "distill_diffusers", "load_images", "model_pool"]
