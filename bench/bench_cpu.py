"""The CPU path side by side, in one process: genie_fast's options against eager float32, and
diffusers' own scheduler loop on the same UNet (issue 30).

Models: the bundled model (`genie_fast.models.load_default`, its default solver) and a random-weight
diffusers ``UNet2DModel`` of similar size (1.11M parameters against 1.15M; 1x32x32, channels
(32, 64, 64), attention at 16x16) sampled with DDIM on a ``DDIMScheduler``'s 10 timesteps:
genie_fast through `from_diffusers` + `scheduler_grid` (the same grid and steps as the scheduler),
and diffusers' loop ``eps = unet(x, t).sample; x = scheduler.step(eps, t, x).prev_sample``.

Variants (each a `SamplingEngine` on the CPU, NFE --nfe):
  eager        float32, the model as is (no copy, no channels-last): what sample() ran before
  cl           channels_last=True: a channels-last float32 copy
  compile      compile=True: torch.compile (inductor) of the float32 network
  cl+compile   both
  bf16         net_dtype=bf16 (a channels-last bf16 copy): only where the CPU has native bf16,
               or with --emulated-bf16 (GENIE_FAST_CPU_BF16=1: emulated, batch 1 only, to show why not)
  bf16+compile where bf16 runs natively: the best combination there
  diffusers    diffusers' DDIMScheduler loop on the same UNet (diffusers model only)
Each (model, batch, threads) group: every variant warmed up once (compiles counted apart, once
per shape: the engines live for the whole run), then --reps interleaved rounds; rows hold the
minimum and median, the speed-up of the minimum against eager's, and the relative L2 difference of
the samples from eager's. For eager and diffusers, forward hooks on the UNet time the network
inside the calls (bench_overhead.NetworkClock): host = (call - network) / network.

    PYTHONPATH=. python bench/bench_cpu.py --json bench/results/cpu/cpu.json
    PYTHONPATH=. python bench/bench_cpu.py --batches 1 --threads 1 --reps 1 --models bundled   # a quick look
    PYTHONPATH=. python bench/bench_cpu.py --cli --json bench/results/cpu/cli.json   # the main job end to end

--cli: the README's main job (``genie-fast sample --n 64 --nfe 10 --threads T``, T the first of
--threads) in fresh processes, with the defaults against ``--net-dtype fp32``, interleaved.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_overhead import NetworkClock  # noqa: E402

from genie_fast import devices  # noqa: E402
from genie_fast.engine import SamplingEngine, make_noise  # noqa: E402
from genie_fast.solvers import DEFAULT_SOLVER  # noqa: E402


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def diffusers_unet(seed: int = 0):
    import diffusers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=32, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(32, 64, 64),
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                 attention_head_dim=32).eval()
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    return unet, sched


@contextlib.contextmanager
def forced_bf16():
    old = os.environ.get(devices.CPU_BF16_ENV)
    os.environ[devices.CPU_BF16_ENV] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(devices.CPU_BF16_ENV, None)
        else:
            os.environ[devices.CPU_BF16_ENV] = old


class Case:
    """One model: its variants as callables noise -> samples, built once (engines, compiles kept)."""

    def __init__(self, name: str, args):
        self.name, self.args = name, args
        self.native = devices.cpu_bf16_native()
        if name == "bundled":
            from genie_fast.models import load_default

            self.model = load_default().eval()
            self.unet = self.model.unet
            self.kw = {"solver": args.solver or DEFAULT_SOLVER, "nfe": args.nfe}
            self.shape = tuple(self.model.image_shape)
        else:
            from genie_fast.models.diffusers import from_diffusers, scheduler_grid

            self.unet, self.sched = diffusers_unet()
            self.sched.set_timesteps(args.nfe)
            self.model = from_diffusers(self.unet, self.sched).eval()
            self.kw = {"solver": "ddim", **scheduler_grid(self.sched)}
            self.shape = (1, 32, 32)
        self.params = sum(p.numel() for p in self.unet.parameters()) + (
            sum(p.numel() for p in self.model.head.parameters()) if name == "bundled" else 0)
        self.engines, self.nfe_spent = {}, {"diffusers": args.nfe}

    def variants(self, batch: int) -> dict:
        names = ["eager", "cl", "compile", "cl+compile"]
        if self.native:
            names += ["bf16", "bf16+compile"]
        elif self.args.emulated_bf16 and batch == 1:
            names += ["bf16 (emulated)"]
        if self.name == "diffusers":
            names += ["diffusers"]
        return {n: self.runner(n) for n in names if n not in self.args.skip.split(",")}

    def clocked(self, variant: str):
        """The modules whose forward time is the network's, for the variants timed so (else None)."""
        if variant == "diffusers":
            return [self.unet]
        if variant != "eager":
            return None
        net = self.engines[variant].network(torch.float32)  # the model as is, or the engine's copy
        return [net.unet, net.head] if self.name == "bundled" else [net]

    def engine(self, variant: str) -> SamplingEngine:
        eng = self.engines.get(variant)
        if eng is None:
            opts = {"channels_last": "cl" in variant or variant.startswith("bf16"), "compile": "compile" in variant}
            eng = self.engines[variant] = SamplingEngine(self.model, device="cpu", **opts)
        return eng

    def runner(self, variant: str):
        if variant == "diffusers":
            def run(z):
                x = z * self.sched.init_noise_sigma
                for t in self.sched.timesteps:
                    eps = self.unet(x, t).sample
                    x = self.sched.step(eps, t, x).prev_sample
                return x
            return run
        eng = self.engine(variant)
        net_dtype = torch.bfloat16 if variant.startswith("bf16") else torch.float32
        ctx = forced_bf16 if "emulated" in variant else contextlib.nullcontext

        def run(z):
            with ctx():
                x, self.nfe_spent[variant] = eng.sample(z, net_dtype=net_dtype, **self.kw)
            return x
        return run


def timed(fn, z, clock_modules=None):
    clock = NetworkClock(clock_modules) if clock_modules else None
    t0 = time.perf_counter()
    with torch.no_grad():
        out = fn(z)
    total = time.perf_counter() - t0
    if clock is not None:
        clock.remove()
    return out, total, (None if clock is None else clock.seconds)


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def group(case: Case, batch: int, threads: int, args) -> list[dict]:
    torch.set_num_threads(threads)
    z = make_noise(batch, case.shape, seed=args.seed)
    runs = case.variants(batch)
    warm, outs = {}, {}
    for name, fn in runs.items():  # warm-up: compiles, copies, plans; compile time apart
        before = case.engines[name].cache_info().get("compile_s", 0.0) if name in case.engines else 0.0
        outs[name], warm[name], _ = timed(fn, z)
        after = case.engines[name].cache_info().get("compile_s", 0.0) if name in case.engines else 0.0
        warm[name] = (warm[name], after - before)
    times = {n: [] for n in runs}
    host = {n: [] for n in runs}
    for _ in range(args.reps):
        for name, fn in runs.items():
            hooks = case.clocked(name)
            _, total, inside = timed(fn, z, hooks)
            times[name].append(total)
            if inside:
                host[name].append((total - inside) / inside)
    rows = []
    base = min(times["eager"]) if "eager" in times else None
    for name in runs:
        row = {"model": case.name, "params": case.params, "batch": batch, "threads": threads, "variant": name,
               "solver": "ddim (DDIMScheduler.step)" if name == "diffusers" else case.kw["solver"],
               "nfe": case.nfe_spent[name], "reps": args.reps,
               "min_ms": 1e3 * min(times[name]), "median_ms": 1e3 * statistics.median(times[name]),
               "times_ms": [round(1e3 * t, 2) for t in times[name]],
               "first_call_s": round(warm[name][0], 3), "compile_s": round(warm[name][1], 3),
               "speedup_vs_eager": None if base is None else base / min(times[name]),
               "rel_diff_vs_eager": rel(outs[name], outs["eager"]) if "eager" in outs else None}
        if host[name]:
            row["host_over_network"] = statistics.median(host[name])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | batch | threads | variant | min ms | median ms | vs eager | compile s | host/net | diff vs eager |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "variant" not in r:
            continue
        host = f"{100 * r['host_over_network']:.1f}%" if "host_over_network" in r else ""
        comp = f"{r['compile_s']:.0f}" if r["compile_s"] > 0.5 else ""
        lines.append(f"| {r['model']} | {r['batch']} | {r['threads']} | {r['variant']} | {r['min_ms']:.0f} | "
                     f"{r['median_ms']:.0f} | {r['speedup_vs_eager']:.2f}x | {comp} | {host} | "
                     f"{r['rel_diff_vs_eager']:.1e} |")
    return "\n".join(lines)


def cli_end_to_end(args) -> list[dict]:
    """The README's main job end to end (a fresh process each: imports, model, sampling, PNG) with the
    defaults and with --net-dtype fp32, interleaved, --reps rounds; rows with the minimum."""
    import subprocess
    import tempfile

    exe = str(Path(sys.executable).with_name("genie-fast"))
    runs = {"defaults": [], "--net-dtype fp32": ["--net-dtype", "fp32"]}
    times = {k: [] for k in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.reps):
            for name, extra in runs.items():
                cmd = [exe, "sample", "--n", "64", "--nfe", str(args.nfe), "--out", f"{tmp}/grid.png",
                       "--threads", args.threads.split(",")[0], *extra]
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, capture_output=True)
                times[name].append(time.perf_counter() - t0)
    rows = []
    for name in runs:
        row = {"cli": "genie-fast sample --n 64 --nfe %d --out grid.png --threads %s %s" % (
                   args.nfe, args.threads.split(",")[0], " ".join(runs[name])),
               "min_s": min(times[name]), "median_s": statistics.median(times[name]),
               "times_s": [round(t, 3) for t in times[name]],
               "speedup_vs_fp32": min(times["--net-dtype fp32"]) / min(times[name])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="bundled,diffusers")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--nfe", type=int, default=10)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--solver", default=None, help="the bundled model's solver (default: sample()'s default)")
    p.add_argument("--skip", default="", help="variants to leave out, comma-separated")
    p.add_argument("--emulated-bf16", action="store_true",
                   help="on a CPU without native bf16: also time bf16 forced (emulated), batch 1 only")
    p.add_argument("--cli", action="store_true", help="only the CLI main job end to end, defaults vs --net-dtype fp32")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_name(),
           "cores": os.cpu_count(), "torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(),
           "bf16_native": devices.cpu_bf16_native(), "command": "python bench/bench_cpu.py " + " ".join(argv or sys.argv[1:]),
           "loadavg_start": os.getloadavg()}
    print(json.dumps(env), flush=True)
    rows = [env]
    if args.cli:
        rows += cli_end_to_end(args)
        args.models = ""
    for name in filter(None, args.models.split(",")):
        case = Case(name, args)
        for batch in map(int, args.batches.split(",")):
            for threads in map(int, args.threads.split(",")):
                rows += group(case, batch, threads, args)
    env["loadavg_end"] = os.getloadavg()
    if not args.cli:
        print("\n" + table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
