"""CPU loop overhead of `genie_fast.sample()` on the bundled model, every solver, one thread.

Two measures per (solver, batch), interleaved in one process (each round: the forwards, then one
`sample()` call with the library defaults: NFE 10, grid "auto", AFS):

  ratio      median T(sample) / (network cost) - 1, the network cost being the NFE x one forward
             (network + head for genie) of the same model and batch, timed in the same rounds; for
             genie_exact each step's JVP is timed itself (its NFE count is a convention, `JVP_NFE`)
  host       inside the same sample() calls: the time outside the network's modules (forward hooks
             on the U-Net and the head time every call, JVPs included) over the time inside them:
             what the loop itself adds, immune to the machine's load changing between rounds.

Goal (issue 11): <= 5% for every solver at batch 1 and 64. Also printed: the JVP / forward ratio
behind `solvers.JVP_NFE`.

    PYTHONPATH=. python bench/bench_overhead.py --batches 1,64 --rounds 5 --json bench/results/overhead/overhead.json
    PYTHONPATH=. python bench/bench_overhead.py --precision     # half-precision network error per solver
    PYTHONPATH=. python bench/bench_overhead.py --stub          # the loop alone, on a model costing nothing

--precision: relative L2 error of x0 with an fp16 / bf16 network against the fp32 network (same
noise, NFE 10, float32 state), every solver, random-weight tiny and fmnist_small U-Nets; the
solvers are called directly with an fp16/bf16 copy (the engine refuses half precision on the CPU).
--precision --bundled: the same on the bundled (trained) model with the settings of the agreement
check `bench/profile_sample.py --check --model default --batch 8 --nfe 10` (its noise, batch 8,
quadratic grid, no AFS, no denoising): the figures behind genie_fast.precision's bundled-model rows.

    PYTHONPATH=. python bench/bench_overhead.py --precision --bundled \\
        --json bench/results/precision/precision_bundled.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch import nn

import genie_fast
from genie_fast.engine import _converted_copy, make_noise
from genie_fast.solvers import AUTO_GRID, DEFAULT_AFS, HEAD_SOLVERS, JVP_NFE, SOLVERS, jvp, nfe_of, steps_for_nfe


class NetworkClock:
    """Forward hooks on the network's modules: total seconds spent inside them (outermost calls)."""

    def __init__(self, modules):
        self.seconds, self._depth, self._t0 = 0.0, 0, 0.0
        self.handles = []
        for m in modules:
            self.handles += [m.register_forward_pre_hook(self._enter), m.register_forward_hook(self._leave)]

    def _enter(self, *args):
        if self._depth == 0:
            self._t0 = time.perf_counter()
        self._depth += 1

    def _leave(self, *args):
        self._depth -= 1
        if self._depth == 0:
            self.seconds += time.perf_counter() - self._t0

    def remove(self):
        for h in self.handles:
            h.remove()


def overhead(args):
    from genie_fast.models import load_default

    model = load_default()
    solvers = args.solvers.split(",")
    rows = []
    for batch in map(int, args.batches.split(",")):
        z = make_noise(batch, model.image_shape, seed=0)
        t = torch.full((batch,), 0.5)
        tangent = (torch.randn_like(z), torch.full((batch,), 0.1))

        def forward():
            with torch.no_grad():
                model(z, t)

        def forward_head():
            with torch.no_grad():
                model.eps_and_head(z, t)

        def jvp_call():
            with torch.no_grad():
                jvp(model, (z, t), tangent)

        for fn in (forward, forward_head, jvp_call):  # warm-up
            fn()
        for solver in solvers:
            genie_fast.sample(model, noise=z, solver=solver)  # warm-up: engine, plan, memo
            times = {"fwd": [], "fwd_head": [], "jvp": [], "sample": []}
            host, inside = [], []
            for _ in range(args.rounds):
                for name, fn in (("fwd", forward), ("fwd_head", forward_head)) + ((("jvp", jvp_call),)
                                                                                if solver == "genie_exact" else ()):
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
                clock = NetworkClock([model.unet, model.head])
                t0 = time.perf_counter()
                _, nfe = genie_fast.sample(model, noise=z, solver=solver)
                total = time.perf_counter() - t0
                clock.remove()
                times["sample"].append(total)
                host.append(total - clock.seconds)
                inside.append(clock.seconds)
            med = {k: statistics.median(v) for k, v in times.items() if v}
            steps = steps_for_nfe(solver, genie_fast.solvers.DEFAULT_NFE, DEFAULT_AFS)
            if solver == "genie_exact":  # evaluations: eps at every non-AFS step and its JVP
                evals = steps - DEFAULT_AFS
                cost = evals * (med["fwd"] + med["jvp"])
            else:
                one = med["fwd_head"] if solver in HEAD_SOLVERS else med["fwd"]
                cost = nfe * one
            row = {"batch": batch, "solver": solver, "grid": AUTO_GRID[solver], "nfe": nfe,
                   "sample_ms": med["sample"] * 1e3, "forward_ms": med["fwd"] * 1e3,
                   "forward_head_ms": med["fwd_head"] * 1e3, "network_cost_ms": cost * 1e3,
                   "ratio_overhead": med["sample"] / cost - 1,
                   "host_ms": statistics.median(host) * 1e3,
                   "host_overhead": statistics.median([h / i for h, i in zip(host, inside)])}
            if solver == "genie_exact":
                row["jvp_ms"] = med["jvp"] * 1e3
                row["jvp_over_forward"] = med["jvp"] / med["fwd"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\ntorch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread, "
          f"{args.rounds} interleaved rounds, medians; JVP_NFE = {JVP_NFE}")
    print(f"{'solver':>13} {'B':>3} {'grid':>8} {'NFE':>3} {'sample ms':>10} {'network ms':>10} "
          f"{'ratio':>7} {'host ms':>8} {'host/net':>8}")
    for r in rows:
        print(f"{r['solver']:>13} {r['batch']:>3} {r['grid']:>8} {r['nfe']:>3} {r['sample_ms']:>10.1f} "
              f"{r['network_cost_ms']:>10.1f} {100 * r['ratio_overhead']:>6.1f}% {r['host_ms']:>8.2f} "
              f"{100 * r['host_overhead']:>7.2f}%")
    for r in rows:
        if "jvp_over_forward" in r:
            print(f"JVP / forward at batch {r['batch']}: {r['jvp_over_forward']:.2f}")
    return rows


def precision(args):
    from genie_fast.models.head import GenieModel
    from genie_fast.models.unet import UNet

    rows = []
    for config in ("tiny", "fmnist_small"):
        torch.manual_seed(0)
        model = GenieModel(UNet(config))
        for mod in model.modules():  # the zero-initialised output convs get PyTorch's default init
            if isinstance(mod, nn.Conv2d):
                mod.reset_parameters()
        model.eval()
        c = model.unet.config
        z = make_noise(4, (c.in_channels, c.image_size, c.image_size), seed=1)
        s = model.schedule
        for solver in args.solvers.split(","):
            steps = steps_for_nfe(solver, 10, DEFAULT_AFS)
            from genie_fast.schedule import time_grid

            ts = time_grid(s, steps, AUTO_GRID[solver])
            with torch.no_grad():
                ref, _ = SOLVERS[solver](model, z, ts, s, afs=DEFAULT_AFS)
                row = {"model": config, "solver": solver, "nfe": nfe_of(solver, steps, DEFAULT_AFS)}
                for name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
                    low = _converted_copy(model, "cpu", dt)
                    x, _ = SOLVERS[solver](low, z, ts, s, afs=DEFAULT_AFS, net_dtype=dt)
                    row[name] = float((x.double() - ref.double()).norm() / ref.double().norm())
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def precision_bundled(args):
    """--precision on the bundled model, as bench/profile_sample.py --check runs it (fp32 reference
    with TF32 irrelevant here: the CPU has none)."""
    from genie_fast.models import load_default
    from genie_fast.schedule import time_grid

    model = load_default().eval()
    s, rows, batch, nfe = model.schedule, [], 8, 10
    z = torch.randn((batch, *model.image_shape), generator=torch.Generator().manual_seed(5))  # profile_sample's
    low = {dt: _converted_copy(model, "cpu", dt) for dt in (torch.float16, torch.bfloat16)}
    for solver in args.solvers.split(","):
        steps = steps_for_nfe(solver, nfe, False, False)
        ts = time_grid(s, steps, "quadratic")
        with torch.no_grad():
            ref, _ = SOLVERS[solver](model, z, ts, s, afs=False, denoise=False)
            row = {"model": "default", "solver": solver, "batch": batch, "nfe": nfe_of(solver, steps, False, False)}
            for name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
                x, _ = SOLVERS[solver](low[dt], z, ts, s, afs=False, denoise=False, net_dtype=dt)
                row[name] = float((x.double() - ref.double()).norm() / ref.double().norm())
                per = (x.double() - ref.double()).flatten(1).norm(dim=1) / ref.double().flatten(1).norm(dim=1)
                row[name + "_worst_sample"] = float(per.max())
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


class _Stub(nn.Module):
    """An eps model (with a head) that costs next to nothing: sample() time is then the loop's own."""

    image_shape = (1, 32, 32)

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))

    def forward(self, x, t):
        return x * self.w

    def eps_and_head(self, x, t):
        return x * self.w, torch.cat([x, x, x], 1)


def stub(args):
    """Whole sample() calls (defaults, batch 1) on `_Stub`: memo lookup, weight check and loop."""
    model, rows = _Stub(), []
    z = make_noise(1, _Stub.image_shape, seed=0)
    for solver in args.solvers.split(","):
        genie_fast.sample(model, noise=z, solver=solver)
        times = []
        for _ in range(30):
            t0 = time.perf_counter()
            genie_fast.sample(model, noise=z, solver=solver)
            times.append(time.perf_counter() - t0)
        rows.append({"solver": solver, "min_ms": min(times) * 1e3, "median_ms": statistics.median(times) * 1e3})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,64")
    p.add_argument("--solvers", default=",".join(SOLVERS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--precision", action="store_true", help="half-precision network error instead")
    p.add_argument("--bundled", action="store_true",
                   help="--precision on the bundled model with profile_sample --check's settings")
    p.add_argument("--stub", action="store_true", help="sample() on a model that costs nothing (the loop alone)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.precision:
        rows = precision_bundled(args) if args.bundled else precision(args)
    else:
        rows = stub(args) if args.stub else overhead(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "threads": 1},
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
