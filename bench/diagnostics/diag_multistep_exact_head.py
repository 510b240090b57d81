"""How much of genie_multistep's result on the bundled model is the distilled head's error?

    python bench/diagnostics/diag_multistep_exact_head.py

The bundled model's network with its exact d eps / d gamma (a forward-mode JVP per step, given to
genie_multistep as a perfect head: head_error 0; the JVP's cost is not counted, this measures the
method, not a sampler) against the distilled head and UniPC, with AFS at NFE 5 / 10 / 15 on the
edm and logsnr grids; 16 noises (seed 123), error against RK4 in log gamma (100 steps) of the same
network: median per-sample RMS error and RMSE. order 4 is run with the exact head too.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_quality import rk4_reference  # noqa: E402

from genie_fast.models.default import load_default  # noqa: E402
from genie_fast.schedule import time_grid  # noqa: E402
from genie_fast.solvers import SOLVERS, exact_deps  # noqa: E402


def main():
    torch.set_num_threads(1)
    model = load_default().eval()
    sch = model.schedule
    noise = torch.randn(16, *model.image_shape, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        ref = rk4_reference(model, sch, noise, 100)

    class ExactHead(torch.nn.Module):
        head_error = 0.0

        def forward(self, x, t):
            return model(x, t)

        def eps_and_deps(self, x, t):  # t: the model time, which is continuous t for the VP schedule
            eps = model(x, t)
            return eps, exact_deps(model, x, t, eps, sch)

    def err(out):
        e = (out.float() - ref).pow(2)
        return f"{float(e.flatten(1).mean(1).sqrt().median()):.4f} / {float(e.mean().sqrt()):.4f}"

    runs = {"exact head": ("genie_multistep", ExactHead(), {}),
            "exact head, order 4": ("genie_multistep", ExactHead(), {"order": 4}),
            "distilled head": ("genie_multistep", model, {}),
            "unipc": ("unipc", model, {})}
    print("| grid, solver | NFE 5 | NFE 10 | NFE 15 |  (median / RMSE)")
    print("|---|---|---|---|")
    for grid in ("edm", "logsnr"):
        for label, (name, m, kw) in runs.items():
            cells = []
            for nfe in (5, 10, 15):
                with torch.no_grad():
                    out, _ = SOLVERS[name](m, noise, time_grid(sch, nfe + 1, grid), sch, afs=True, **kw)
                cells.append(err(out))
            print(f"| {grid}, {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
