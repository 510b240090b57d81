"""The training data of a two-stage cascade (issue 32): a low-resolution base model and a
super-resolution model conditioned on the low-resolution image (Ho et al. 2021, "Cascaded
Diffusion Models").

* A network of ``image_size`` r smaller than the data's (the base model, ``fmnist16_cond``) trains
  on the images average-pooled to r x r (`fit_images`): the same low-resolution images the
  upsampler is conditioned on, so the base model's samples are what the upsampler saw.
* A super-resolution network (``UNetConfig.low_res_size`` r > 0, ``fmnist_sr``) trains on pairs
  (x_0, y) with y = x_0 average-pooled to r x r, noised at a level s ~ U[0, aug_max] it is told
  (noise-conditioning augmentation, `low_res_cond`): y_s = alpha_s y + sigma_s z on the model's
  VP schedule. At sampling, `genie_fast.cascade` noises the base model's samples the same way at
  one chosen level. Training and head distillation use the same inputs (``--aug-max``).
* `init_low_res_from`: a super-resolution network started from a network without a
  low-resolution input (the bundled 32x32 model): every weight copied, the new input channels
  of ``conv_in`` and the augmentation embedding starting at zero (the same function at step 0).
"""
from __future__ import annotations


import torch

from ..cascade import check_aug_level
from ..models.unet import UNet, UNetConfig, augment_low_res, downsample
from ..schedule import VPSchedule

__all__ = ["DEFAULT_AUG_MAX", "check_aug_max", "fit_images", "low_res_cond", "init_low_res_from"]

# The augmentation levels drawn in training, s ~ U[0, DEFAULT_AUG_MAX] (VP time): at 0.3 the
# low-resolution input keeps alpha = 0.63 of its signal, enough to cover the levels a cascade samples at.
DEFAULT_AUG_MAX = 0.3


def check_aug_max(value, name: str = "--aug-max") -> float:
    """The largest augmentation level of training: a number in [0, 1] (VP time; 0: no augmentation)."""
    return check_aug_level(value, name, "the largest noise level of the low-resolution input")


def fit_images(x: torch.Tensor, config: UNetConfig) -> torch.Tensor:
    """Training images (N, C, H, H) at the network's ``image_size`` (average-pooled when smaller)."""
    if x.shape[-1] < config.image_size:
        raise ValueError(f"the data's {x.shape[-1]}x{x.shape[-1]} images are smaller than the network's "
                         f"image_size {config.image_size}")
    return downsample(x, config.image_size)


def low_res_cond(x0: torch.Tensor, config: UNetConfig, aug_max: float, schedule: VPSchedule,
                 generator: torch.Generator | None = None) -> dict:
    """The conditioning inputs of a super-resolution network for a batch of its images x_0:
    {"low_res": x_0 average-pooled to low_res_size and noised at s, "aug_level": s}, s ~ U[0, aug_max]."""
    if not config.low_res_size:
        raise ValueError("low_res_cond: the network has no low-resolution input (config low_res_size = 0)")
    level = aug_max * torch.rand(x0.shape[0], generator=generator)
    y = downsample(x0, config.low_res_size)
    return {"low_res": augment_low_res(y, level, schedule, generator), "aug_level": level.to(x0.dtype)}


def init_low_res_from(model: UNet, src: dict, what: str) -> None:
    """Load ``src`` (the state dict of a network without a low-resolution input, of the same shape
    otherwise) into super-resolution network ``model``: the x channels of ``conv_in`` copied, its
    low-resolution channels zero, the augmentation embedding as initialised (output zero), a label
    embedding the source lacks at zero. ``what`` names the source in errors."""
    ours = model.state_dict()
    c = model.config.in_channels
    new = sorted(set(ours) - set(src))
    bad = [k for k in new if not k.startswith(("label_emb.", "aug_emb."))] + sorted(set(src) - set(ours))
    bad += [k for k in src if k in ours and k != "conv_in.weight" and src[k].shape != ours[k].shape]
    w = src.get("conv_in.weight")
    if w is None or tuple(w.shape) != (ours["conv_in.weight"].shape[0], c, *ours["conv_in.weight"].shape[2:]):
        bad.append("conv_in.weight")
    if bad:
        raise ValueError(f"{what}: its U-Net does not match config {model.config.to_dict()} without the "
                         f"low-resolution input (differences: {bad[:4]})")
    state = dict(src)
    conv = torch.zeros_like(ours["conv_in.weight"])
    conv[:, :c] = w
    state["conv_in.weight"] = conv
    for k in new:
        state[k] = torch.zeros_like(ours[k]) if k.startswith("label_emb.") else ours[k]
    model.load_state_dict(state)
