"""NVTX ranges for Nsight Systems / Nsight Compute, named after the sampling stages.

    from genie_fast.profiling import nvtx_range
    with nvtx_range("network"):
        eps = model(x, t)

The sampling engine emits, in eager mode, one range per step (``step``) holding one range per
stage (``network``, ``head`` nested inside ``network`` for a GENIE model, ``update``), and in graph
mode one ``replay`` range around each CUDA-graph launch; the whole call sits in a ``sample`` range.
Ranges are host-side push/pop pairs on the calling thread (a profiler places the GPU work that was
launched inside them).

Which library emits them (`emitter()` says, and `bench/gpu_check.sh` reports it):

  ``"nvtx"``             the ``nvtx`` package: ranges in the domain ``genie_fast``. It works
                         without a GPU; with no tool attached its domain is a dummy whose calls do
                         nothing (about 0.15 us a pair on a CPU of this project's CI).
  ``"torch.cuda.nvtx"``  the fallback when the ``nvtx`` package is missing and torch is a CUDA
                         build (the lent H200 image has no ``nvtx`` package, but its torch has
                         NVTX): the same names in NVTX's default domain (torch's binding has no
                         domains).
  ``None``               neither (a CPU torch without the ``nvtx`` package): plain no-ops.

`ncu_nvtx_filter(name)` gives the ``--nvtx-include`` expression that selects a range for the
emitter in use: ``genie_fast@sample/`` in the domain, ``sample/`` in the default domain (push/pop
ranges need the trailing "/"). The environment variable ``GENIE_FAST_NVTX`` = ``auto`` (default),
``nvtx``, ``torch`` or ``off`` picks the emitter at import; `configure()` picks it at run time.

Cost: the event attributes are built once per name, so a push/pop pair is two C calls.
"""
from __future__ import annotations

import contextlib
import functools
import os

__all__ = ["DOMAIN", "nvtx_range", "push", "pop", "emitter", "configure",
           "ncu_nvtx_filter", "EMITTERS"]

DOMAIN = "genie_fast"
EMITTERS = ("nvtx", "torch.cuda.nvtx")

# Colours only help reading a timeline; one per stage.
_COLORS = {"sample": "green", "step": "blue", "network": "orange", "head": "purple",
           "update": "cyan", "replay": "red", "capture": "yellow", "warmup": "yellow"}

try:  # the nvtx package works without a GPU; when no tool is attached its domain is a dummy
    import nvtx as _nvtx
except ImportError:  # the lent H200 image has none: torch.cuda.nvtx is the fallback
    _nvtx = None


@functools.lru_cache(maxsize=None)
def _domain():
    return _nvtx.get_domain(DOMAIN)


@functools.lru_cache(maxsize=256)
def _attributes(name: str):
    return _domain().get_event_attributes(message=name, color=_COLORS.get(name.split(":")[0], "white"))


def _nvtx_push(name: str) -> None:
    _domain().push_range(_attributes(name))


def _nvtx_pop() -> None:
    _domain().pop_range()


def _noop(*_args) -> None:
    return None


def _torch_nvtx():
    """torch.cuda.nvtx when this torch was built with NVTX (a CUDA build), else None.

    A CUDA build emits ranges without a GPU; a CPU build's binding raises on first use.
    """
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    if not torch.version.cuda or not hasattr(torch._C, "_nvtx"):
        return None
    return torch.cuda.nvtx


def _resolve(preference: str):
    """(emitter name, push, pop, why) for a preference: auto, nvtx, torch or off."""
    if preference not in ("auto", "nvtx", "torch", "off"):
        raise ValueError(f"GENIE_FAST_NVTX must be auto, nvtx, torch or off, got {preference!r}")
    if preference == "off":
        return None, _noop, _noop, "switched off (GENIE_FAST_NVTX=off)"
    if preference in ("auto", "nvtx") and _nvtx is not None:
        return "nvtx", _nvtx_push, _nvtx_pop, f"nvtx package, domain {DOMAIN!r}"
    tn = _torch_nvtx() if preference in ("auto", "torch") else None
    if tn is not None:
        why = ("the nvtx package is missing: " if preference == "auto" else "") + \
            "torch.cuda.nvtx, NVTX's default domain"
        return "torch.cuda.nvtx", tn.range_push, tn.range_pop, why
    if preference == "nvtx":
        return None, _noop, _noop, "the nvtx package is not installed: ranges are no-ops"
    return None, _noop, _noop, ("neither the nvtx package nor a CUDA build of torch: ranges are no-ops"
                                if preference == "auto" else "torch has no NVTX (a CPU build): ranges are no-ops")


_emitter, _push, _pop, _why = _resolve(os.environ.get("GENIE_FAST_NVTX", "auto").strip().lower() or "auto")


def configure(preference: str = "auto") -> str | None:
    """Pick the emitter (auto, nvtx, torch, off); returns its name (None: no-ops).

    Never open ranges across a call: a range pushed with one emitter must be popped with it.
    """
    global _emitter, _push, _pop, _why
    _emitter, _push, _pop, _why = _resolve(preference)
    return _emitter


def emitter() -> str | None:
    """Which library emits the ranges: "nvtx", "torch.cuda.nvtx", or None (no-ops)."""
    return _emitter


def emitter_info() -> dict:
    """The emitter, why it was chosen, and the ncu filter of the ``sample`` range (for reports)."""
    return {"emitter": _emitter, "why": _why, "nvtx_package": _nvtx is not None,
            "ncu_filter_sample": ncu_nvtx_filter("sample") if _emitter else None}


def ncu_nvtx_filter(*names: str) -> str:
    """Nsight Compute's ``--nvtx-include`` expression for the push/pop range path ``names``
    (outermost first), for the emitter in use: ``genie_fast@sample/`` or ``sample/``."""
    path = "/".join(names) + "/"
    return f"{DOMAIN}@{path}" if _emitter == "nvtx" else path


def push(name: str) -> None:
    """Open a push/pop range ``name`` (close it with `pop`)."""
    _push(name)


def pop() -> None:
    """Close the innermost open range."""
    _pop()


@contextlib.contextmanager
def nvtx_range(name: str):
    """Context manager around `push`/`pop`; names should be few and fixed (attributes are cached)."""
    _push(name)
    try:
        yield
    finally:
        _pop()
