"""dpmpp_2m_step: the fused DPM-Solver++(2M) update against the eager chain (dpmpp_2m_step_ref).

CPU: fused C++ (functional and out=) vs eager, ratio of medians in one run, at 64x3x32x32 fp32,
for each --threads value. GPU (when present): achieved bandwidth of torch / triton / cuda at
batch 256 against a device-to-device copy moving the same bytes, measured in the same run.

    python bench/bench_dpmpp_2m_step.py --threads 1
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
    x0_prev = torch.randn(shape, generator=g, device=device)
    return x_bar, eps, x0_prev, c


def eager(a):
    return lambda: ops.dpmpp_2m_step_ref(*a)


def fused(a, backend):
    return lambda: ops.dpmpp_2m_step(*a, backend=backend)


def fused_out(a, backend):
    out = (torch.empty_like(a[0]), torch.empty_like(a[1]), torch.empty_like(a[0]))
    return lambda: ops.dpmpp_2m_step(*a, backend=backend, out=out)


def bytes_moved(a):
    x_bar, eps, x0_prev, _ = a
    # read x_bar, eps, x0_prev; write x_bar_next, x0 (state dtype) and x_next (network dtype)
    return 4 * x_bar.nbytes + 2 * eps.nbytes


if __name__ == "__main__":
    _step_bench.run("dpmpp_2m_step", __doc__, make, eager, fused, fused_out, bytes_moved)
