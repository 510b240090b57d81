"""Save and load GenieModels as safetensors + JSON config; the bundled Fashion-MNIST default.

A model is two files with the same stem: ``<stem>.safetensors`` (float32 weights of the U-Net
under ``unet.`` and the head under ``head.``) and ``<stem>.json``::

    {"format": "genie_fast.GenieModel", "version": 1,
     "unet": {...UNetConfig...}, "head": {...HeadConfig...},
     "schedule": {"beta_min": 0.1, "beta_d": 19.9, "t_end": 0.001},
     "provenance": {...how the weights were made...}}

Loading checks every tensor name and shape against the config and refuses a mismatch.
"""
from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..schedule import VPSchedule
from .head import GenieHead, GenieModel, HeadConfig
from .unet import UNet, UNetConfig

FORMAT = "genie_fast.GenieModel"
VERSION = 1
DEFAULT_STEM = "fmnist_genie"


class ModelFileError(ValueError):
    pass


def _stem(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".json", ".safetensors") else p


def save_model(model: GenieModel, path: str | os.PathLike, provenance: dict | None = None) -> Path:
    """Write <stem>.safetensors and <stem>.json; returns the stem."""
    if not isinstance(model.schedule, VPSchedule):
        raise TypeError(f"only VPSchedule models can be saved, got {type(model.schedule).__name__}")
    stem = _stem(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    s = model.schedule
    config = {"format": FORMAT, "version": VERSION, "unet": model.unet.config.to_dict(),
              "head": model.head.config.to_dict(),
              "schedule": {"beta_min": s.beta_min, "beta_d": s.beta_d, "t_end": s.t_end},
              "provenance": provenance or {}}
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(stem) + ".safetensors", metadata={"format": FORMAT})
    Path(str(stem) + ".json").write_text(json.dumps(config, indent=2) + "\n")
    return stem


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> GenieModel:
    """Load a GenieModel saved by :func:`save_model` (path: the stem, .json or .safetensors)."""
    stem = _stem(path)
    json_path, st_path = Path(str(stem) + ".json"), Path(str(stem) + ".safetensors")
    for f in (json_path, st_path):
        if not f.exists():
            raise FileNotFoundError(f"model file {f} not found (a model is <stem>.json + <stem>.safetensors)")
    try:
        config = json.loads(json_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{json_path}: not valid JSON ({e})") from None
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise ModelFileError(f"{json_path}: expected format {FORMAT!r} version {VERSION}, "
                             f"found {config.get('format')!r} version {config.get('version')!r}")
    try:
        unet = UNet(UNetConfig.from_dict(config["unet"]))
        head = GenieHead(HeadConfig.from_dict(config["head"]))
        schedule = VPSchedule(**config["schedule"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{json_path}: bad config ({type(e).__name__}: {e})") from None
    model = GenieModel(unet, head, schedule)

    tensors = load_file(str(st_path), device=str(map_location))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(expected[k].shape) != tuple(tensors[k].shape))
    if missing or unexpected or wrong:
        def few(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        parts = []
        if missing:
            parts.append(f"missing tensors: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {few(unexpected)}")
        if wrong:
            parts.append("shape mismatch: " + few([f"{k} {tuple(tensors[k].shape)} != {tuple(expected[k].shape)}"
                                                   for k in wrong]))
        raise ModelFileError(f"{st_path} does not match the architecture in {json_path}: " + "; ".join(parts))
    model.load_state_dict(tensors)
    model.provenance = config.get("provenance", {})
    return model.to(map_location).eval()


def default_model_path() -> Path:
    return Path(str(resources.files("genie_fast") / "assets" / DEFAULT_STEM))


def load_default(map_location: str | torch.device = "cpu") -> GenieModel:
    """The bundled Fashion-MNIST GenieModel (1x32x32, data in [-1, 1]) from genie_fast/assets."""
    stem = default_model_path()
    if not Path(str(stem) + ".safetensors").exists():
        raise FileNotFoundError(f"bundled default model missing at {stem}.safetensors; the package "
                                f"data (genie_fast/assets/*) was not installed")
    return load_model(stem, map_location)
