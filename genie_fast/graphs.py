"""CUDA graph capture of one solver call (`capture`), and what makes a call uncapturable.

Before capture the solver runs ``warmup`` times on a side stream (cuDNN/cuBLAS handles, Triton
autotuning, and the plan's solver tables are made there; the last warm-up run is checked for host
syncs). Static buffers: the input x_T and the output, owned by the `GraphEntry`; everything in
between lives in the memory pool the caller shares between its graphs."""
from __future__ import annotations

import dataclasses
import time

import torch

from .profiling import nvtx_range

__all__ = ["GraphEntry", "Uncapturable", "capture"]


@dataclasses.dataclass
class GraphEntry:
    """A captured graph and its static buffers (input noise, output sample), kept alive together."""

    graph: "torch.cuda.CUDAGraph"
    x_in: torch.Tensor
    out: torch.Tensor
    plan: object  # the solvers.Plan the graph reads
    capture_s: float


class Uncapturable(RuntimeError):
    """The loop syncs host and device, or CUDA refused its capture: run it eagerly instead."""


class sync_check:
    """Raise `Uncapturable` if the code inside makes a synchronizing CUDA call."""

    def __enter__(self):
        self._old = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, exc_type, exc, tb):
        torch.cuda.set_sync_debug_mode(self._old)
        if exc is not None and "synchroniz" in str(exc):
            raise Uncapturable(f"it syncs host and device ({str(exc).splitlines()[0]})") from exc
        return False


def capture(solve, x_T: torch.Tensor, plan, *, pool, stream, warmup: int, device) -> GraphEntry:
    """Warm up ``solve(x_in)`` on `stream`, then capture it into `pool`.

    The first warm-up run absorbs one-time work (handles, lazy init, autotuning, the plan's
    solver tables, which copy to the device); the last runs under
    `torch.cuda.set_sync_debug_mode("error")`, so a model that syncs host and device is found
    before any capture starts. Errors of the model itself propagate; what makes a model
    uncapturable raises `Uncapturable`.
    """
    x_in = torch.empty_like(x_T, memory_format=torch.contiguous_format)
    x_in.copy_(x_T)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream), nvtx_range("warmup"):
        for i in range(warmup):
            if i == warmup - 1 and warmup > 1:
                with sync_check():
                    solve(x_in)
            else:
                solve(x_in)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    t0 = time.perf_counter()
    try:
        with nvtx_range("capture"), torch.cuda.graph(graph, pool=pool, stream=stream):
            out = solve(x_in)
    except Exception as err:
        raise Uncapturable(f"capture failed: {type(err).__name__}: {err}") from err
    torch.cuda.synchronize(device)
    return GraphEntry(graph=graph, x_in=x_in, out=out, plan=plan, capture_s=time.perf_counter() - t0)
