"""genie_fast: GENIE higher-order diffusion sampling (Dockhorn, Vahdat, Kreis, NeurIPS 2022), fast.

    x0, nfe = genie_fast.sample(n=64)                        # the bundled default model, defaults
    x0, nfe = genie_fast.sample(eps_model, noise=z, solver="dpmpp_2m", steps=20, device="cuda")
    genie_fast.nfe_of("heun", steps=5)                       # 10 network evaluations
    x0, nfe = genie_fast.sample(n=10, labels=range(10), guidance_scale=2.0)   # one per class, guided
    x_T, nfe = genie_fast.encode(model, x0, steps=20)        # data -> latents (decode: sample(noise=x_T, afs=False))
    x0, nfe = genie_fast.sample_cascade("my.cascade.json", n=16, base={"nfe": 10}, upsampler={"nfe": 10})
"""
from . import _ext  # noqa: F401  (loads the compiled ops, or warns once and falls back)
from .schedule import VPSchedule, DiscreteVPSchedule, time_grid, coeff_table

__version__ = "0.1.0"

_LAZY = {"sample": ".sampling", "encode": ".sampling", "SOLVERS": ".solvers", "nfe_of": ".solvers", "steps_for_nfe": ".solvers",
         "SamplingEngine": ".engine", "tune_grid": ".tuning", "save_tuned_grid": ".grid_store",
         "sample_cascade": ".cascade", "load_cascade": ".cascade"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'genie_fast' has no attribute {name!r}")


__all__ = ["sample", "encode", "sample_cascade", "load_cascade", "tune_grid", "save_tuned_grid", "SOLVERS", "nfe_of", "steps_for_nfe", "SamplingEngine", "VPSchedule", "DiscreteVPSchedule",
           "time_grid", "coeff_table"]
