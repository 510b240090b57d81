"""genie_step: the fused op against the eager PyTorch chain of the same math (genie_step_ref).

CPU: fused C++ (functional and out=) vs eager, ratio of medians in one run, at 64x3x32x32 fp32,
for each --threads value. GPU (when present): achieved bandwidth of torch / triton / cuda at
batch 256 against a device-to-device copy moving the same bytes, measured in the same run.

    python bench/bench_genie_step.py --threads 1
"""
import torch

from genie_fast import ops
from genie_fast.schedule import VPSchedule, coeff_table, time_grid

import _step_bench


def make(shape, net_dtype, device):
    s = VPSchedule()
    c = coeff_table(s, time_grid(s, 10))[4].to(device)
    g = torch.Generator(device=device).manual_seed(0)
    x_bar = torch.randn(shape, generator=g, device=device)
    eps = torch.randn(shape, generator=g, device=device).to(net_dtype)
    head = torch.randn((shape[0], 3 * shape[1], *shape[2:]), generator=g, device=device).to(net_dtype)
    return x_bar, eps, head, c


def eager(a):
    return lambda: ops.genie_step_ref(*a)


def fused(a, backend):
    return lambda: ops.genie_step(*a, backend=backend)


def fused_out(a, backend):
    out = (torch.empty_like(a[0]), torch.empty_like(a[1]))
    return lambda: ops.genie_step(*a, backend=backend, out=out)


def bytes_moved(a):
    x_bar, eps, head, _ = a
    # read x_bar, eps, head; write x_bar_next (state dtype) and x_next (network dtype)
    return 2 * x_bar.nbytes + 2 * eps.nbytes + head.nbytes


if __name__ == "__main__":
    _step_bench.run("genie_step", __doc__, make, eager, fused, fused_out, bytes_moved)
