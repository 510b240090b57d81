"""Conditioning inputs, checked once: the mappings ``cond`` / ``negative_cond`` of `genie_fast.sample`,
`genie_fast.encode` and the engine, the model's null input, and the optional decoder of a latent model.

A conditioning mapping holds batch-first tensors that the model receives as keyword arguments,
``model(x, t, **cond)`` (and ``model.eps_and_head(x, t, **cond)`` for GENIE): class labels are one
such input (``labels``), a diffusers ``UNet2DConditionModel``'s text embeddings another
(``encoder_hidden_states``). A value's first dimension is the batch B, or 1 for one value shared
by every sample (it is expanded). A model may declare

* ``cond_names``: the keyword arguments it takes (any other name is refused, by name);
* ``null_cond``: a mapping of its null inputs (e.g. the empty prompt's embeddings), the default of
  the negative branch of classifier-free guidance; a class-conditional model's null label
  (``num_classes``) is its null input without being declared;
* ``space``: "latent" when it samples in a VAE's latent space (else "pixel"), and ``decode``: the
  decoder that turns its samples into images (``sample(decode=True)``).
"""
from __future__ import annotations

import collections.abc
from pathlib import Path

import numpy as np
import torch

__all__ = ["check_cond", "check_cond_names", "null_cond", "cond_signature", "check_decode", "space_of",
           "read_cond_file"]


def check_cond(cond, batch: int, name: str = "cond", device=None) -> dict:
    """cond (a mapping name -> batch-first tensor or array, or None) -> {name: tensor (batch, ...)}.

    Each value's first dimension must be `batch` or 1 (one value for every sample, expanded); names
    must be keyword-argument names; floating values must be finite. Raises naming ``name['key']``."""
    if cond is None:
        return {}
    if not isinstance(cond, collections.abc.Mapping):
        raise TypeError(f"{name} must be a mapping of input names to batch-first tensors (e.g. "
                        f"{{'encoder_hidden_states': emb}}), got {type(cond).__name__}")
    out = {}
    for key, value in cond.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise TypeError(f"{name}: the names are the model's keyword arguments (identifiers), got {key!r}")
        where = f"{name}[{key!r}]"
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{where} must be a tensor (batch-first), got {type(value).__name__}")
        if value.dim() == 0:
            raise ValueError(f"{where} must have a batch dimension first (shape (B, ...) or (1, ...)), "
                             f"got a scalar")
        if value.is_complex():
            raise TypeError(f"{where} must be real, got dtype {value.dtype}")
        if value.shape[0] not in (batch, 1):
            raise ValueError(f"{where} has {value.shape[0]} rows for {batch} samples (shape {tuple(value.shape)}): "
                             f"give one row per sample, or one row for all")
        if value.is_floating_point() and value.device.type != "meta" and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{where} holds {int((~torch.isfinite(value)).sum())} non-finite (NaN or inf) values")
        if value.shape[0] != batch:
            value = value.expand(batch, *value.shape[1:])
        out[key] = value.detach().to(device=device).contiguous() if device is not None \
            else value.detach().contiguous()
    return out


def check_cond_names(model, cond: dict, name: str = "cond"):
    """Refuse a name the model does not take, where it declares ``cond_names``."""
    names = getattr(model, "cond_names", None)
    if names is None:
        return
    for key in cond:
        if key not in names:
            raise ValueError(f"{name}[{key!r}]: {type(model).__name__} takes no conditioning input {key!r}; "
                             f"it takes {sorted(names) or 'none'}")


def null_cond(model, batch: int, device=None) -> dict:
    """The model's null inputs, expanded to `batch` rows: its declared ``null_cond`` mapping, and for
    a class-conditional model (``num_classes`` K > 0) the null label K."""
    out = check_cond(getattr(model, "null_cond", None), batch, f"{type(model).__name__}.null_cond", device)
    k = getattr(model, "num_classes", 0)
    if k and "labels" not in out:
        out["labels"] = torch.full((batch,), int(k), dtype=torch.long, device=device)
    return out


def cond_signature(cond: dict) -> tuple:
    """What a captured graph depends on in a conditioning mapping: names, shapes, dtypes, devices."""
    return tuple(sorted((k, tuple(v.shape), v.dtype, str(v.device)) for k, v in cond.items()))


def space_of(model) -> str:
    """The space a model samples in: its ``space`` ("pixel" or "latent"; default "pixel")."""
    return getattr(model, "space", "pixel") or "pixel"


def check_decode(decode, model):
    """decode (None, True: the model's own ``decode``, or a callable latents -> images) -> None or the callable."""
    if decode is None or decode is False:
        return None
    if decode is True:
        fn = getattr(model, "decode", None)
        if not callable(fn):
            raise ValueError(f"decode=True needs a model with a decoder (.decode, e.g. from_diffusers(..., vae=)); "
                             f"{type(model).__name__} samples in {space_of(model)} space and has none: pass "
                             f"decode=a callable")
        return fn
    if not callable(decode):
        raise TypeError(f"decode must be None, True or a callable latents -> images (a VAE's decoder), "
                        f"got {type(decode).__name__}")
    return decode



def read_cond_file(path, flag: str = "--cond") -> dict:
    """The conditioning inputs of an .npz file: one array per input name (``encoder_hidden_states``,
    ``labels``, ...), first dimension one row per sample (or 1: one for all). Read without pickle
    (a file cannot run code); object arrays are refused."""
    path = Path(path)
    if path.suffix != ".npz" or not path.is_file():
        raise ValueError(f"{flag} {path}: not an .npz file (one array per conditioning input, one row per sample)")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # a truncated zip, an object array, ...
        raise ValueError(f"{flag} {path}: cannot be read as an .npz of arrays ({type(e).__name__}: {e})") from None
    if not arrays:
        raise ValueError(f"{flag} {path}: holds no arrays")
    out = {}
    for k, a in arrays.items():
        if a.dtype.kind not in "biuf" or a.ndim == 0:
            raise ValueError(f"{flag} {path}: {k!r} must be a numeric array with a row per sample, got "
                             f"{a.dtype} of shape {a.shape}")
        t = torch.from_numpy(np.ascontiguousarray(a))
        out[k] = t.long() if a.dtype.kind in "iu" else t.float() if a.dtype.kind == "f" else t  # float32 inputs
    return out
