"""`genie_fast.sample_cascade`: a base model, then a super-resolution model conditioned on its samples.

The paper's largest images come from a cascade (GENIE, arXiv 2210.05475: a base model and an
upsampler, each sampled with GENIE). Here both stages are GENIE models of this package: the
base samples (C, r, r) images; the upsampler (``UNetConfig.low_res_size`` r) samples (C, H, H)
images given ``cond={"low_res": y, "aug_level": s}``, the base samples noised at level s
(noise-conditioning augmentation: y = alpha_s x_low + sigma_s z, the level the upsampler was
trained over, `genie_fast.training.cascade`). Each stage is one `genie_fast.sample` call, with its
own solver, budget, grid and guidance, so each runs through the engine (on CUDA one graph per
stage; the upsampler's low-resolution input is a device buffer of its conditioning wrapper, so new
base samples replay the same graph). The returned NFE is the sum of both stages'.

A cascade on disk is a small JSON file, ``<name>.cascade.json``, naming the two exported models
(`genie_fast.models.save_model` stems, relative to the file's folder) and the default level::

    {"format": "genie_fast.Cascade", "version": 1,
     "base": "fmnist16_genie", "upsampler": "fmnist_sr_genie",
     "aug_level": 0.05, "provenance": {...}}

Noise: the base stage's x_T is ``make_noise(n, base shape, seed)`` (so stage 1 is exactly
``sample(base, n=n, seed=seed)``); the upsampler's x_T and the augmentation noise come from a
second generator seeded ``seed + 2**32`` (no batch seed's stream), drawn sample after sample, so
sample i depends on the seed and i only, as in `genie_fast.sample`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from importlib import resources
from pathlib import Path

import torch

from .checks import check_device, check_flag, check_int
from .devices import default_device
from .models.default import ModelFileError, load_model, read_json
from .models.unet import augment_low_res
from .noise import check_seed, make_noise
from .sampling import sample

__all__ = ["Cascade", "CASCADE_FORMAT", "DEFAULT_AUG_LEVEL", "STAGE_OPTIONS", "load_cascade", "save_cascade",
           "sample_cascade", "cascade_path"]

CASCADE_FORMAT = "genie_fast.Cascade"
CASCADE_VERSION = 1
SUFFIX = ".cascade.json"
DEFAULT_CASCADE = "fmnist_cascade"  # genie_fast/assets/fmnist_cascade.cascade.json, once bundled
# The upsampler's default augmentation level (VP time; alpha 0.985, sigma 0.17): inside the trained
# range U[0, 0.3]; a cascade file sets its own.
DEFAULT_AUG_LEVEL = 0.05
# The options a stage takes (as `genie_fast.sample`), besides a solver's own keywords (head=, order=).
STAGE_OPTIONS = ("solver", "nfe", "steps", "grid", "afs", "denoise", "guidance_scale")
# sample() arguments that are sample_cascade's own (one value for both stages), and those a cascade sets itself
_SHARED = ("noise", "n", "seed", "labels", "device", "backend", "dtype", "net_dtype", "check_finite")
_FIXED = ("cond", "negative_cond", "seeds", "shape", "model", "decode", "schedule")


@dataclasses.dataclass
class Cascade:
    """A base model and an upsampler conditioned on its samples (checked to fit: `check_pair`)."""

    base: torch.nn.Module
    upsampler: torch.nn.Module
    aug_level: float = DEFAULT_AUG_LEVEL
    provenance: dict = dataclasses.field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self):
        check_pair(self.base, self.upsampler)
        self.aug_level = check_aug_level(self.aug_level, "Cascade.aug_level")


def check_aug_level(value, name: str = "aug_level", what: str = "the noise level of the low-resolution input") -> float:
    """An augmentation level of the low-resolution input (`what` it is, for the message): a number in
    [0, 1] (VP time), else a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} ({what}, a VP time) must be a number in [0, 1], got {value!r}")
    return float(value)


def low_res_shape(model) -> tuple | None:
    """(C, r, r) of an upsampler's low-resolution input; None for a model without one."""
    cfg = getattr(getattr(model, "unet", None), "config", None)
    r = getattr(cfg, "low_res_size", 0)
    return (cfg.in_channels, r, r) if r else None


def check_pair(base, upsampler):
    """Refuse a base model and an upsampler that do not fit: the upsampler must take a low-resolution
    input of the base model's image shape, and the base model must take none."""
    want = low_res_shape(upsampler)
    if want is None:
        raise ValueError(f"the upsampler ({type(upsampler).__name__}) has no low-resolution input: a cascade's "
                         f"second stage is a super-resolution network (UNetConfig.low_res_size > 0)")
    if low_res_shape(base) is not None:
        raise ValueError("the base model is itself a super-resolution network (it needs a low_res input); "
                         "the first stage of a cascade samples from noise alone")
    got = tuple(getattr(base, "image_shape", ()) or ())
    if got != want:
        raise ValueError(f"the base model samples {got} images; the upsampler takes low-resolution inputs of "
                         f"shape {want}")


def cascade_path(path: str | os.PathLike | None = None) -> Path:
    """The cascade file of ``path`` (``NAME`` or ``NAME.cascade.json``; None: the bundled one)."""
    if path is None:
        return Path(str(resources.files("genie_fast") / "assets" / DEFAULT_CASCADE) + SUFFIX)
    p = Path(path)
    return p if p.name.endswith(".json") else Path(str(p) + SUFFIX)


def save_cascade(path: str | os.PathLike, base: str | os.PathLike, upsampler: str | os.PathLike,
                 aug_level: float = DEFAULT_AUG_LEVEL, provenance: dict | None = None) -> Path:
    """Write the cascade file naming model stems ``base`` and ``upsampler`` (stored relative to the
    file's folder where they lie under it); both models are loaded and checked to fit first."""
    aug_level = check_aug_level(aug_level)
    file = cascade_path(path)
    if provenance is not None and not isinstance(provenance, dict):
        raise TypeError(f"provenance must be a dict, got {type(provenance).__name__}")
    folder = file.parent.resolve()
    names = {}
    for role, stem in (("base", base), ("upsampler", upsampler)):
        stem = Path(stem)
        stem = stem.with_suffix("") if stem.suffix in (".json", ".safetensors") else stem
        names[role] = stem
    check_pair(load_model(names["base"]), load_model(names["upsampler"]))
    entry = {"format": CASCADE_FORMAT, "version": CASCADE_VERSION}
    for role, stem in names.items():
        full = stem.resolve()
        entry[role] = str(full.relative_to(folder)) if full.is_relative_to(folder) else str(full)
    entry |= {"aug_level": aug_level, "provenance": provenance or {}}
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{file}.tmp")
    tmp.write_text(json.dumps(entry, indent=2) + "\n")
    os.replace(tmp, file)
    return file


def load_cascade(path: str | os.PathLike | None = None, map_location="cpu", dtype=None) -> Cascade:
    """The cascade of file ``path`` (`cascade_path`; None: the bundled one): both models loaded
    (`load_model`: every check of a model file) and checked to fit. A file that fails is refused
    with a ModelFileError naming it."""
    file = cascade_path(path)
    if not file.is_file():
        bundled = " (the bundled cascade is not in this install: docs/guide.md, 'Cascade', trains and " \
                  "bundles it)" if path is None else ""
        raise FileNotFoundError(f"cascade file {file} not found{bundled}")
    entry = read_json(file)
    if entry.get("format") != CASCADE_FORMAT or entry.get("version") != CASCADE_VERSION:
        raise ModelFileError(f"{file}: expected format {CASCADE_FORMAT!r} version {CASCADE_VERSION}, found "
                             f"{entry.get('format')!r} version {entry.get('version')!r}")
    models = {}
    for role in ("base", "upsampler"):
        stem = entry.get(role)
        if not isinstance(stem, str) or not stem:
            raise ModelFileError(f"{file}: {role!r} must name a model stem (a path), got {stem!r}")
        models[role] = load_model(file.parent / stem, map_location, dtype)
    try:
        aug = check_aug_level(entry.get("aug_level", DEFAULT_AUG_LEVEL), "aug_level")
        prov = entry.get("provenance", {})
        return Cascade(models["base"], models["upsampler"], aug, prov if isinstance(prov, dict) else {}, file)
    except ValueError as e:
        raise ModelFileError(f"{file}: {e}") from None


def _stage_options(options, name: str) -> dict:
    """A stage's sample() options, checked by name: `STAGE_OPTIONS` and solver keywords; what both
    stages share (labels, device, noise, ...) is an argument of sample_cascade itself."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"{name} must be a dict of that stage's sampling options ({', '.join(STAGE_OPTIONS)}, "
                        f"solver keywords), got {type(options).__name__}")
    for key in options:
        if not isinstance(key, str):
            raise TypeError(f"{name}: option names are strings, got {key!r}")
        if key in _SHARED:
            raise ValueError(f"{name}[{key!r}]: {key} is shared by both stages: give it to sample_cascade itself")
        if key in _FIXED:
            raise ValueError(f"{name}[{key!r}]: not an option of a cascade's stage (the stages' models, shapes, "
                             f"schedules and noise are the cascade's; the upsampler's cond is the base model's "
                             f"samples)")
    return dict(options)


def _noise(n, seed, noise, base_shape, up_shape, low_shape):
    """(base x_T, upsampler x_T, augmentation noise), module docstring."""
    if noise is not None:
        if not isinstance(noise, (tuple, list)) or len(noise) != 3:
            raise TypeError("noise must be a tuple (base x_T (B, *base shape), upsampler x_T (B, *shape), "
                            "augmentation noise (B, *low-resolution shape)), or None (n= and seed=)")
        want = (base_shape, up_shape, low_shape)
        for i, (z, shape, what) in enumerate(zip(noise, want, ("base x_T", "upsampler x_T", "augmentation"))):
            if not isinstance(z, torch.Tensor) or not z.is_floating_point() or tuple(z.shape[1:]) != shape \
                    or z.dim() != len(shape) + 1 or z.shape[0] != noise[0].shape[0]:
                raise ValueError(f"noise[{i}] ({what}) must be a float tensor (B, *{shape}) with the same B as "
                                 f"noise[0], got {tuple(getattr(z, 'shape', ())) or type(z).__name__}")
            if n is not None and z.shape[0] != n:
                raise ValueError(f"n={n} disagrees with noise[{i}]'s batch size {z.shape[0]}")
        return tuple(noise)
    if n is None:
        raise ValueError("give n= (and seed=) or noise=(base x_T, upsampler x_T, augmentation noise)")
    seed = check_seed("seed", seed)
    z_low = make_noise(check_int("n", n, 1), base_shape, seed)
    g = torch.Generator().manual_seed(seed + 2 ** 32)  # a stream no batch seed has
    rest = torch.stack([torch.randn(math.prod(up_shape) + math.prod(low_shape), generator=g) for _ in range(n)])
    split = math.prod(up_shape)
    return z_low, rest[:, :split].reshape(n, *up_shape), rest[:, split:].reshape(n, *low_shape)


def sample_cascade(cascade=None, n=None, seed=0, noise=None, labels=None, aug_level=None, base=None,
                   upsampler=None, device=None, backend="auto", dtype=None, net_dtype=None, check_finite=True,
                   return_low_res=False):
    """Sample a cascade: the base model, then the upsampler conditioned on its samples; returns
    (samples (B, C, H, H), NFE per sample of both stages together) (and the base samples, (B, C, r, r),
    with return_low_res=True).

    cascade: a `Cascade`, a cascade file (`cascade_path`), or None (the bundled one).
    n, seed / noise: n samples of batch seed ``seed`` (module docstring), or noise = (base x_T,
        upsampler x_T, augmentation noise).
    labels: for class-conditional stages (both must be), as in `genie_fast.sample`; each stage guides
        with its own ``guidance_scale``.
    aug_level: the level s in [0, 1] the base samples are noised at before the upsampler sees them
        (default: the cascade's); the upsampler is told s.
    base, upsampler: each stage's options, dicts of `genie_fast.sample` keywords: solver, nfe / steps,
        grid, afs, denoise, guidance_scale, and the solver's own (e.g. head=); defaults as sample's.
    device, backend, dtype, net_dtype, check_finite: for both stages, as in `genie_fast.sample`.
    The base samples are clamped to the data range [-1, 1] before they are noised.
    """
    base_kw, up_kw = _stage_options(base, "base"), _stage_options(upsampler, "upsampler")
    check_flag("return_low_res", return_low_res)
    if cascade is None or isinstance(cascade, (str, os.PathLike)):
        cascade = load_cascade(cascade)
    elif not isinstance(cascade, Cascade):
        raise TypeError(f"cascade must be a Cascade, a cascade file or None (the bundled one), got "
                        f"{type(cascade).__name__}")
    level = cascade.aug_level if aug_level is None else check_aug_level(aug_level)
    if labels is not None:
        for role, model in (("base", cascade.base), ("upsampler", cascade.upsampler)):
            if not getattr(model, "num_classes", 0):
                raise ValueError(f"labels were given but the {role} model is not class-conditional "
                                 f"(num_classes = 0): a cascade's labels go to both stages")
    low_shape = low_res_shape(cascade.upsampler)
    z_low, z_up, z_aug = _noise(n, seed, noise, tuple(cascade.base.image_shape),
                                tuple(cascade.upsampler.image_shape), low_shape)
    device = default_device(cascade.base) if device is None else check_device(device)
    common = dict(labels=labels, device=device, backend=backend, dtype=dtype, net_dtype=net_dtype,
                  check_finite=check_finite)
    x_low, nfe_base = sample(cascade.base, noise=z_low, **common, **base_kw)
    y = augment_low_res(x_low.clamp(-1.0, 1.0), torch.full((x_low.shape[0],), level, dtype=torch.float64,
                                                           device=x_low.device),
                        cascade.upsampler.schedule, noise=z_aug.to(x_low.device))
    cond = {"low_res": y, "aug_level": torch.full((x_low.shape[0],), level, dtype=y.dtype, device=y.device)}
    x, nfe_up = sample(cascade.upsampler, noise=z_up, cond=cond, **common, **up_kw)
    return (x, nfe_base + nfe_up, x_low) if return_low_res else (x, nfe_base + nfe_up)
