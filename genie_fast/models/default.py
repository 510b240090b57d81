"""Save and load GenieModels as safetensors + JSON config; the bundled Fashion-MNIST default.

A model is two files with the same stem: ``<stem>.safetensors`` (float32 weights of the U-Net
under ``unet.`` and the head under ``head.``) and ``<stem>.json``::

    {"format": "genie_fast.GenieModel", "version": 1,
     "unet": {...UNetConfig...}, "head": {...HeadConfig...},
     "schedule": {"beta_min": 0.1, "beta_d": 19.9, "t_end": 0.001},
     "provenance": {...how the weights were made...}}

Loading checks the config's values, and every tensor's name, shape and dtype (float32) against
it, and that every weight is finite; a file that fails any check (or cannot be read at all) is
refused with a :class:`ModelFileError` naming the file. A third file, ``<stem>.grids.json``, may hold
time grids tuned for the model (`genie_fast.grid_store`); the loaded model records where it would be.
"""
from __future__ import annotations

import json
import math
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
    """A model or head file that cannot be used: unreadable, truncated, of another format, with
    impossible config values, or with weights of the wrong name, shape or dtype, or not finite."""


def read_json(path: Path) -> dict:
    """A model's JSON config as a dict; ModelFileError naming the file otherwise."""
    try:
        config = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ModelFileError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def read_weights(st_path: Path, expected: dict, config_path: Path | None = None,
                 device: str | torch.device = "cpu") -> dict:
    """The tensors of safetensors file ``st_path``, checked against ``expected`` (a state_dict):
    the same names and shapes, the same dtype (never cast silently), every value finite."""
    try:
        tensors = load_file(str(st_path), device=str(device))
    except Exception as e:  # truncated, corrupted, not a safetensors file at all
        raise ModelFileError(f"{st_path}: cannot be read as safetensors ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    common = sorted(set(expected) & set(tensors))
    wrong = [k for k in common if tuple(expected[k].shape) != tuple(tensors[k].shape)]
    dtypes = [k for k in common if k not in wrong and tensors[k].dtype != expected[k].dtype]
    if missing or unexpected or wrong or dtypes:
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
        if dtypes:
            parts.append("dtype mismatch (not cast): " + few([f"{k} {tensors[k].dtype} != {expected[k].dtype}"
                                                              for k in dtypes]))
        where = f"the architecture in {config_path}" if config_path is not None else "the model"
        raise ModelFileError(f"{st_path} does not match {where}: " + "; ".join(parts))
    bad = [k for k in common if tensors[k].is_floating_point() and not bool(torch.isfinite(tensors[k]).all())]
    if bad:
        raise ModelFileError(f"{st_path}: non-finite (NaN or inf) weights in {', '.join(bad[:5])}"
                             + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""))
    return tensors


def _check_numbers(path: Path, what: str, values: dict):
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ModelFileError(f"{path}: {what}.{k} must be a finite number, got {v!r}")


def _check_head_error(value, what: str, error=ValueError) -> float:
    """The head's relative error: a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise error(f"{what} must be a finite number >= 0 (the head's relative error), got {value!r}")
    return float(value)


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
    head_error = getattr(model, "head_error", None)
    if head_error is not None:
        config["head_error"] = _check_head_error(head_error, "model.head_error")
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    bad = [k for k, v in tensors.items() if not bool(torch.isfinite(v).all())]
    if bad:  # load_model would refuse the file: refuse to write it
        raise ValueError(f"the model has non-finite (NaN or inf) weights in {', '.join(bad[:5])}; not saved")
    # each file under a temporary name first, then renamed: a kill never leaves a half-written model
    st, js = Path(str(stem) + ".safetensors"), Path(str(stem) + ".json")
    save_file(tensors, f"{st}.tmp", metadata={"format": FORMAT})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(f"{st}.tmp", 0o666 & ~umask)  # safetensors writes 0600; a model file is for everyone to read
    os.replace(f"{st}.tmp", st)
    Path(f"{js}.tmp").write_text(json.dumps(config, indent=2) + "\n")
    os.replace(f"{js}.tmp", js)
    return stem


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu", dtype=None) -> GenieModel:
    """Load a GenieModel saved by :func:`save_model` (path: the stem, .json or .safetensors).

    The file's weights are float32 (checked as stored, never cast on reading); the model is then
    converted to `dtype`: float32 or float64, default torch's default dtype (so a float64 study
    under ``torch.set_default_dtype(torch.float64)`` gets a float64 model). A float32 model on the CPU
    has its 4-D (convolution) weights in channels-last memory order; float64 keeps the stored layout."""
    dtype = _model_dtype(dtype)
    stem = _stem(path)
    json_path, st_path = Path(str(stem) + ".json"), Path(str(stem) + ".safetensors")
    for f in (json_path, st_path):
        if not f.exists():
            raise FileNotFoundError(f"model file {f} not found (a model is <stem>.json + <stem>.safetensors)")
    config = read_json(json_path)
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise ModelFileError(f"{json_path}: expected format {FORMAT!r} version {VERSION}, "
                             f"found {config.get('format')!r} version {config.get('version')!r}")
    try:
        unet_config = UNetConfig.from_dict(config["unet"])
        head_config = HeadConfig.from_dict(config["head"])
        if not isinstance(config["schedule"], dict):
            raise ValueError(f"schedule must be a JSON object, got {config['schedule']!r}")
        _check_numbers(json_path, "schedule", config["schedule"])
        schedule = VPSchedule(**config["schedule"])
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ModelFileError):
            raise
        raise ModelFileError(f"{json_path}: bad config ({type(e).__name__}: {e})") from None
    unet = UNet(unet_config)
    got = (head_config.in_channels, head_config.feature_channels, head_config.temb_dim)
    want = (unet_config.in_channels, unet.feature_channels, unet.temb_dim)
    if got != want:
        raise ModelFileError(f"{json_path}: the head reads (channels, features, temb) = {got}, "
                             f"its U-Net gives {want}")
    model = GenieModel(unet, GenieHead(head_config), schedule).float()  # the stored dtype, whatever the default
    model.load_state_dict(read_weights(st_path, model.state_dict(), json_path, map_location))
    model.provenance = config.get("provenance", {})
    model.grids_path = Path(f"{stem}.grids.json")  # its tuned grids, if any (genie_fast.grid_store)
    # files written before the head's error was recorded have none: genie_multistep assumes its default
    if config.get("head_error") is not None:
        model.head_error = _check_head_error(config["head_error"], f"{json_path}: head_error", ModelFileError)
    model = model.to(map_location, dtype).eval()
    if dtype == torch.float32 and all(p.device.type == "cpu" for p in model.parameters()):
        # oneDNN's convolutions run 1.04-1.38x faster on NHWC weights (bench/RESULTS.md, "The CPU path"); the
        # engine then runs the model as it is (no copy) and its results differ from NCHW's by ~3e-6
        model = model.to(memory_format=torch.channels_last)
    return model


def _model_dtype(dtype) -> torch.dtype:
    if dtype is None:
        dtype = torch.get_default_dtype()
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64 (the model's weights), got {dtype!r}")
    return dtype


def default_model_path() -> Path:
    return Path(str(resources.files("genie_fast") / "assets" / DEFAULT_STEM))


def load_default(map_location: str | torch.device = "cpu", dtype=None) -> GenieModel:
    """The bundled Fashion-MNIST GenieModel (1x32x32, data in [-1, 1]) from genie_fast/assets, in
    `dtype` (default torch's default dtype; see `load_model`)."""
    stem = default_model_path()
    if not Path(str(stem) + ".safetensors").exists():
        raise FileNotFoundError(f"bundled default model missing at {stem}.safetensors; the package "
                                f"data (genie_fast/assets/*) was not installed")
    return load_model(stem, map_location, dtype)
