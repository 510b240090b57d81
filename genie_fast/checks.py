"""Argument checks shared by the API and the command line.

Each refuses a bad value before any work with a message that names the argument, the value and
what is allowed: TypeError for a value of the wrong kind (2.5 or "3" for a count), ValueError for
one out of range or a place that cannot be used (an output path that is a folder, unwritable,
or of an unknown extension; a CUDA device on a machine without one).
"""
from __future__ import annotations

import importlib
import math
import numbers
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

__all__ = ["check_int", "check_number", "check_flag", "check_device", "check_out_dir", "check_out_file",
           "MissingExtra", "require"]

# The optional dependencies (pyproject.toml's extras): module -> (its pip name, the extra that installs it).
EXTRAS = {"PIL": ("Pillow", "images"), "diffusers": ("diffusers", "diffusers"), "triton": ("triton", "triton")}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it (the
    command line prints it as one line)."""


def require(module: str, needed_for: str):
    """Import `module` (a module of an optional dependency of `EXTRAS`, or one inside it, e.g.
    "PIL.Image"), or raise MissingExtra naming what needs it and the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package, extra = EXTRAS[module.split(".")[0]]
        raise MissingExtra(f"{needed_for} needs {package}, which is not installed: "
                           f"pip install 'genie_fast[{extra}]'") from e


def check_int(name: str, value, least: int | None = None) -> int:
    """``value`` as an int >= least; a bool, float (even 3.0), inf or string is refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int{f' >= {least}' if least is not None else ''}, "
                        f"got {value!r} ({type(value).__name__})")
    if least is not None and value < least:
        raise ValueError(f"{name} must be >= {least}, got {value}")
    return int(value)


def check_number(name: str, value, low: float = -math.inf, high: float = math.inf, *,
                 low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float in [low, high] (an open end with low_open / high_open)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    v = float(value)
    too_low = v <= low if low_open else v < low
    too_high = v >= high if high_open else v > high
    if not math.isfinite(v) or too_low or too_high:
        lo = ("(" if low_open or low == -math.inf else "[") + f"{low:g}"
        hi = f"{high:g}" + (")" if high_open or high == math.inf else "]")
        raise ValueError(f"{name} must be a finite number in {lo}, {hi}, got {value!r}")
    return v


def check_flag(name: str, value, allow_none: bool = False):
    """``value`` as a bool (a numpy bool too); "no", 0 or 1 are refused, not read as truthiness."""
    if value is None and allow_none:
        return None
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False{' or None' if allow_none else ''}, got {value!r}")
    return bool(value)


def check_device(spec, name: str = "device") -> torch.device:
    """``spec`` as a torch.device that exists on this machine (a CUDA index below the GPU count)."""
    try:
        device = spec if isinstance(spec, torch.device) else torch.device(spec)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{name} {spec!r} is not a device (e.g. cpu, cuda, cuda:1): {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {str(spec)!r}: no CUDA GPU is available on this machine "
                             f"(torch {torch.__version__}, torch.cuda.is_available() is False); use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{name} {str(spec)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _writable(folder: Path) -> bool:
    try:  # os.access says yes to root everywhere; a real file says what the file system allows
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def check_out_dir(path, name: str = "--out", shown=None) -> Path:
    """A folder that exists or can be made, and in which files can be written (nothing is created).
    shown: the path the message names (default `path`)."""
    path = Path(path)
    shown = path if shown is None else shown
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {shown}: {path} is a file, not a folder")
    probe = path
    while not probe.exists():  # the nearest existing folder is where the new ones would be made
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{name} {shown}: {probe} is a file, so no folder can be made under it")
    if not _writable(probe):
        raise ValueError(f"{name} {shown}: cannot write in {probe} (permission denied or read-only)")
    return path


def check_out_file(path, extensions: tuple[str, ...], name: str = "--out") -> Path:
    """A file path of one of ``extensions`` (e.g. (".png",)) that is not a folder, in a writable place."""
    raw, path = str(path), Path(path)
    if path.is_dir() or raw.endswith(os.sep):
        raise ValueError(f"{name} {path} is a folder; give a file name such as {path / ('grid' + extensions[0])}")
    if path.suffix.lower() not in extensions:
        raise ValueError(f"{name} {path}: unknown extension {path.suffix!r}; allowed: {', '.join(extensions)}")
    check_out_dir(path.parent, name, shown=path)
    return path


def check_json_object(name: str, text: str | None) -> dict:
    """A flag's JSON object (e.g. --provenance): {} for None or "", else the parsed dict, or a
    ValueError naming the flag."""
    import json

    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{name} is not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {text!r}")
    return value
