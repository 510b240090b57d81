"""NVTX ranges for Nsight Systems / Nsight Compute, all in one domain, ``genie_fast``.

    from genie_fast.profiling import nvtx_range
    with nvtx_range("network"):
        eps = model(x, t)

The sampling engine emits, in eager mode, one range per step (``step``) holding one range per
stage (``network``, ``head`` nested inside ``network`` for a GENIE model, ``update``), and in graph
mode one ``replay`` range around each CUDA-graph launch; the whole call sits in a ``sample`` range.
Ranges are host-side push/pop pairs on the calling thread (a profiler places the GPU work that was
launched inside them). Pass ``--nvtx`` to Nsight Compute and filter with
``--nvtx-include "genie_fast@sample/"``.

Cost: the event attributes are built once per name, so a push/pop pair is two C calls; with no
profiler attached the ``nvtx`` package hands out a dummy domain whose calls do nothing (about
0.15 us a pair on this machine's CPU). Without the ``nvtx`` package the ranges are plain no-ops.
"""
from __future__ import annotations

import contextlib
import functools

__all__ = ["DOMAIN", "nvtx_range", "push", "pop", "available"]

DOMAIN = "genie_fast"

# Colours only help reading a timeline; one per stage.
_COLORS = {"sample": "green", "step": "blue", "network": "orange", "head": "purple",
           "update": "cyan", "replay": "red", "capture": "yellow", "warmup": "yellow"}

try:  # the nvtx package works without a GPU; when no tool is attached its domain is a dummy
    import nvtx as _nvtx
except ImportError:  # pragma: no cover - nvtx is a declared dependency
    _nvtx = None


def available() -> bool:
    """True when the ``nvtx`` package is importable (ranges reach a profiler if one is attached)."""
    return _nvtx is not None


@functools.lru_cache(maxsize=None)
def _domain():
    return _nvtx.get_domain(DOMAIN)


@functools.lru_cache(maxsize=256)
def _attributes(name: str):
    return _domain().get_event_attributes(message=name, color=_COLORS.get(name.split(":")[0], "white"))


def push(name: str) -> None:
    """Open a push/pop range ``name`` in the genie_fast domain (close it with `pop`)."""
    if _nvtx is not None:
        _domain().push_range(_attributes(name))


def pop() -> None:
    """Close the innermost open genie_fast range."""
    if _nvtx is not None:
        _domain().pop_range()


@contextlib.contextmanager
def nvtx_range(name: str):
    """Context manager around `push`/`pop`; names should be few and fixed (attributes are cached)."""
    push(name)
    try:
        yield
    finally:
        pop()
