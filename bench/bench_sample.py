"""Whole-sample latency of GENIE sampling: genie_fast's engine against eager and compiled loops.

One process, every baseline in the same run, on the DDPM++ "deep" CIFAR-10 U-Net (random
weights; timing only) and on the shipped default model when present:

  a     the official-style loop: eager fp32 network + head, Python loop, PyTorch update
        (the reference solver, backend "torch"; cuDNN's TF32 default left as PyTorch ships it)
  b     the same eager loop with an fp16 copy of the network and head
  c_ro  torch.compile(mode="reduce-overhead") of the fp16 step (network + head + update), Python loop
  c_ma  torch.compile(mode="max-autotune") of the same step
  d     genie_fast.engine.SamplingEngine: fp16, the whole loop replayed as one CUDA graph
  floor NFE back-to-back replays of a CUDA graph of ONE fp16 network + head forward

Each time is the median of whole-sample times taken with CUDA events after warm-up (capture and
compile times are reported apart), with min / max / interquartile spread. overhead = T_d / T_floor
- 1. Memory: peak of torch.cuda.max_memory_allocated above the start (weights included; the
graph pool's live blocks are allocations too) and of max_memory_reserved (which also holds the
pool's cached segments), for b and d, each measured from a fresh model copy. Rows go to JSON
keyed by GPU name and library versions; a short table ends the output. Work runs in priority
order under --budget-s; what the budget leaves out is listed.

    python bench/bench_sample.py                      # GPU: the full plan within --budget-s
    python bench/bench_sample.py --smoke              # CPU: a tiny eager-only run of every path
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch

import genie_fast
from genie_fast import engine as engine_mod
from genie_fast.engine import SamplingEngine, _converted_copy
from genie_fast.models.head import GenieModel
from genie_fast.models.unet import UNet
from genie_fast.schedule import COL, coeff_table, time_grid
from genie_fast.solvers import SOLVERS, steps_for_nfe
from genie_fast import ops

CUDA = torch.cuda.is_available()


# --------------------------------------------------------------------------- environment

def versions() -> dict:
    v = {"gpu": torch.cuda.get_device_name() if CUDA else f"cpu ({platform.processor() or platform.machine()})",
         "torch": torch.__version__, "cuda": torch.version.cuda, "genie_fast": genie_fast.__version__,
         "python": platform.python_version(),
         "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        v["triton"] = None
    if CUDA:
        p = torch.cuda.get_device_properties(0)
        v["sm_count"], v["gpu_mem_gib"] = p.multi_processor_count, round(p.total_memory / 2**30, 1)
    return v


def sync():
    if CUDA:
        torch.cuda.synchronize()


def time_calls(fn, reps: int, target_s: float) -> list[float]:
    """Milliseconds of each call of fn (CUDA events on the GPU, perf_counter on the CPU).

    At least `reps` calls, more (up to 5x) while the measured total stays under target_s.
    """
    times = []
    while True:
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= reps and (sum(times) / 1e3 > target_s or len(times) >= 5 * reps):
            return times


def summary(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "iqr_ms": q[2] - q[0], "reps": len(times)}


# --------------------------------------------------------------------------- models

def random_genie(config: str, seed: int = 0) -> GenieModel:
    """U-Net + head with PyTorch's default init everywhere (the zero-initialised output layers too,
    so no layer is trivially skippable). Weights are random: timings only."""
    torch.manual_seed(seed)
    m = GenieModel(UNet(config))
    for mod in m.modules():
        if isinstance(mod, torch.nn.Conv2d):
            mod.reset_parameters()
    return m.eval()


def load_models(names: list[str], log) -> dict:
    models = {}
    for name in names:
        if name == "default":
            try:
                from genie_fast.models import load_default

                models[name] = load_default().eval()
            except Exception as e:  # the default model may not be shipped yet
                log(f"[skip] default model not available: {type(e).__name__}: {e}")
        elif name == "deep":
            models[name] = random_genie("ddpmpp_deep_cifar10")
        else:
            models[name] = random_genie(name)
    return models


def image_shape(model) -> tuple:
    return engine_mod._image_shape(model)


# --------------------------------------------------------------------------- the variants

class Case:
    """One (model, solver, NFE, batch): noise, grid and the per-variant callables."""

    def __init__(self, name, model32, solver, nfe, batch, device, low):
        self.name, self.solver, self.nfe, self.batch, self.low = name, solver, nfe, batch, low
        self.model32 = model32
        self.schedule = model32.schedule
        self.ts = time_grid(self.schedule, steps_for_nfe(solver, nfe))
        g = torch.Generator().manual_seed(1234 + batch)
        self.noise = torch.randn((batch, *image_shape(model32)), generator=g).to(device)
        self.outputs: dict[str, torch.Tensor] = {}

    # (a) and (b): the reference solver, eager, PyTorch update
    def eager_loop(self, model, dtype):
        x = self.noise.to(dtype)

        @torch.no_grad()
        def run():
            return SOLVERS[self.solver](model, x, self.ts, self.schedule, backend="torch")
        return run


def floor_graph(model_low, case: Case):
    """A CUDA graph of one network + head forward; floor = NFE back-to-back replays."""
    x = case.noise.to(case.low)
    t = torch.full((case.batch,), 0.5, device=x.device)

    def fwd():
        if case.solver == "genie":
            return model_low.eps_and_head(x, t)
        return model_low(x, t)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(2):
            fwd()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        fwd()

    def run():
        for _ in range(case.nfe):
            graph.replay()
    return run, graph


def compiled_step(model_low, mode: str):
    """torch.compile of the fp16 step (network + head + PyTorch GENIE update).

    Default dynamic-shape policy: the first batch size compiles static, the second recompiles with
    a dynamic batch that the later sizes reuse (so 2 compiles per mode, not one per size).
    """
    def step(x_bar, x, t, row):
        eps, head_out = model_low.eps_and_head(x, t)
        return ops.genie_step_ref(x_bar, eps, head_out, row)
    return torch.compile(step, mode=mode, fullgraph=False)


def compiled_loop(cstep, case: Case, mode: str):
    """Python loop over the compiled step. reduce-overhead and max-autotune replay cudagraph-tree
    graphs, whose outputs the next replay overwrites: each step's outputs are cloned and a new
    step is marked before the next call."""
    if case.solver != "genie":
        raise NotImplementedError("the compiled baseline is written for the genie solver")
    table = coeff_table(case.schedule, case.ts).to(case.noise.device)
    t_model = case.schedule.model_time(torch.as_tensor(case.ts, dtype=torch.float32))
    t_net = t_model[:, None].expand(-1, case.batch).contiguous().to(case.noise.device)
    graphs = CUDA and mode in ("reduce-overhead", "max-autotune")

    @torch.no_grad()
    def run():
        x_bar = case.noise * table[0, COL["scale"]].to(torch.float32)
        x = case.noise.to(case.low)
        for n in range(len(case.ts) - 1):
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            x_bar, x = cstep(x_bar, x, t_net[n], table[n])
            if graphs:
                x_bar, x = x_bar.clone(), x.clone()
        return x_bar * table[-1, COL["inv_scale_next"]].to(torch.float32)
    return run


# --------------------------------------------------------------------------- memory

@contextlib.contextmanager
def memory_probe(out: dict, prefix: str):
    """Peak allocated and reserved growth (MiB) of what runs inside, from a clean allocator."""
    if not CUDA:
        yield
        return
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    a0, r0 = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    yield
    torch.cuda.synchronize()
    out[f"{prefix}_peak_alloc_mib"] = (torch.cuda.max_memory_allocated() - a0) / 2**20
    out[f"{prefix}_peak_reserved_mib"] = (torch.cuda.max_memory_reserved() - r0) / 2**20


# --------------------------------------------------------------------------- driver

class Bench:
    def __init__(self, args):
        self.args = args
        self.rows: list[dict] = []
        self.skipped: list[str] = []
        self.t_start = time.perf_counter()
        self.env = versions()
        self.log_lines: list[str] = []
        self._compiled: dict = {}
        self.outputs: dict = {}

    def log(self, msg):
        print(msg, flush=True)
        self.log_lines.append(msg)

    def left_s(self):
        return self.args.budget_s - (time.perf_counter() - self.t_start)

    def row(self, case: Case, variant: str, **fields):
        r = {**self.env, "model": case.name, "solver": case.solver, "nfe": case.nfe, "batch": case.batch,
             "dtype": "float32" if variant == "a" else str(case.low).replace("torch.", ""), "variant": variant,
             **fields}
        self.rows.append(r)
        med = fields.get("median_ms")
        self.log(f"  {case.name:>8} nfe={case.nfe:<3} B={case.batch:<4} {variant:<6} "
                 + (f"median {med:9.3f} ms  [{fields['min_ms']:.3f}, {fields['max_ms']:.3f}]  n={fields['reps']}"
                    if med is not None else f"ERROR {fields.get('error')}")
                 + (f"  setup {fields['setup_s']:.1f}s" if fields.get("setup_s") else "")
                 + (f"  vs a {fields['rel_l2_vs_a']:.1e}" if fields.get("rel_l2_vs_a") is not None else ""))
        return r

    def measure(self, case: Case, variant: str, make, need_s: float, **extra):
        """Set up (timed apart), warm up, time. Any failure is recorded, never fatal."""
        if self.left_s() < need_s:
            self.skipped.append(f"{case.name} nfe={case.nfe} B={case.batch} {variant} (budget)")
            return None
        try:
            t0 = time.perf_counter()
            fn = make()
            fn()  # first call: capture / compile / cuDNN autotune
            sync()
            setup_s = time.perf_counter() - t0
            for _ in range(self.args.warmup):
                fn()
            sync()
            times = time_calls(fn, self.args.reps, self.args.target_s)
            out = fn()
            out = out[0] if isinstance(out, tuple) else out
            if isinstance(out, torch.Tensor):
                case.outputs[variant] = out.detach().float().cpu()
                ref = case.outputs.get("a")
                if ref is not None and variant != "a":
                    extra["rel_l2_vs_a"] = float((case.outputs[variant] - ref).norm() / ref.norm())
            return self.row(case, variant, setup_s=setup_s, **summary(times), **extra)
        except Exception as e:
            self.log(traceback.format_exc(limit=3))
            return self.row(case, variant, median_ms=None, error=f"{type(e).__name__}: {str(e)[:300]}")
        finally:
            if CUDA:
                gc.collect()
                torch.cuda.empty_cache()

    def run_case(self, case: Case, variants: list[str]):
        self.log(f"-- {case.name} {case.solver} nfe={case.nfe} batch={case.batch} "
                 f"({self.left_s():.0f}s of budget left)")
        low = case.low
        model32 = case.model32
        dev = case.noise.device
        need = {"a": 5, "b": 5, "d": 10, "floor": 5, "c_ro": self.args.compile_need_s,
                "c_ma": self.args.compile_need_s}
        mem = {}
        results = {}
        for v in variants:
            if v == "a":
                m32 = model32.to(dev)
                results[v] = self.measure(case, "a", lambda: case.eager_loop(m32, torch.float32), need[v])
                model32.cpu()  # off the GPU again before the memory probes of b and d
                del m32
            elif v == "b":
                with memory_probe(mem, "b"):
                    m16 = _converted_copy(model32, dev, low)
                    results[v] = self.measure(case, "b", lambda: case.eager_loop(m16, low), need[v])
                del m16
            elif v == "d":
                with memory_probe(mem, "d"):
                    eng = SamplingEngine(model32, device=dev, dtype=low, max_graphs=1)
                    results[v] = self.measure(
                        case, "d", lambda: (lambda: eng.sample(case.noise, solver=case.solver, nfe=case.nfe)),
                        need[v])
                if results[v] is not None:  # the graph capture alone (setup_s also holds weight copy, warm-up)
                    results[v].update(capture_ms=eng.stats["capture_ms_total"], engine=eng.cache_info())
                del eng
            elif v == "floor":
                m16 = _converted_copy(model32, dev, low)
                holder = {}

                def make_floor():
                    holder["run"], holder["graph"] = floor_graph(m16, case)
                    return holder["run"]
                results[v] = self.measure(case, "floor", make_floor, need[v]) if CUDA else self.measure(
                    case, "floor", lambda: _eager_floor(m16, case), need[v])
                holder.clear()
                del m16
            elif v in ("c_ro", "c_ma"):
                if not CUDA and not self.args.compile_on_cpu:
                    self.skipped.append(f"{case.name} nfe={case.nfe} B={case.batch} {v} (CPU run)")
                    continue
                mode = "reduce-overhead" if v == "c_ro" else "max-autotune"
                if (case.name, v) not in self._compiled:  # one compiled step per model and mode
                    self._compiled.clear()
                    torch._dynamo.reset()
                    m16 = _converted_copy(model32, dev, low)
                    self._compiled[(case.name, v)] = (m16, compiled_step(m16, mode))
                cstep = self._compiled[(case.name, v)][1]
                results[v] = self.measure(case, v, lambda: compiled_loop(cstep, case, mode), need[v],
                                          compile_note="setup_s = compile (first size, and the recompile "
                                                       "with a dynamic batch at the second) + cudagraph record")
        if mem:
            for v in ("b", "d"):
                if results.get(v) is not None:
                    results[v].update({k: val for k, val in mem.items() if k.startswith(v + "_")})
            self.log("     memory MiB: " + ", ".join(f"{k}={val:.0f}" for k, val in mem.items()))
        return results

    def precision(self, name, model32, nfe, batch, dev, low):
        """x0 of the engine (low precision, graph) against fp32 eager with TF32 off: rel. L2 error."""
        if self.left_s() < 20:
            self.skipped.append(f"{name} precision (budget)")
            return
        g = torch.Generator().manual_seed(99)
        z = torch.randn((batch, *image_shape(model32)), generator=g).to(dev)
        try:
            with engine_mod.no_tf32():
                solver = self.args.solver
                ref, _ = SamplingEngine(model32, device=dev, dtype=torch.float32, use_graphs=False).sample(
                    z, solver=solver, nfe=nfe)
                for dt in (low, torch.bfloat16) if low != torch.bfloat16 else (low,):
                    x, _ = SamplingEngine(model32, device=dev, dtype=dt).sample(z, solver=solver, nfe=nfe)
                    err = float((x.double() - ref.double()).norm() / ref.double().norm())
                    self.rows.append({**self.env, "model": name, "solver": solver, "nfe": nfe, "batch": batch,
                                      "variant": "precision", "dtype": str(dt).replace("torch.", ""),
                                      "rel_l2_vs_fp32": err, "graph": CUDA})
                    self.log(f"  precision {name} {solver} nfe={nfe} B={batch} {dt}: "
                             f"rel L2 vs fp32 (TF32 off) = {err:.2e}")
        except Exception as e:
            self.log(f"  precision {name}: ERROR {type(e).__name__}: {e}")
        finally:
            gc.collect()
            if CUDA:
                torch.cuda.empty_cache()

    def plan(self, models):
        """Priority order: every base variant at NFE 10 first, then compiled baselines, then NFE 5/25."""
        a = self.args
        base = [v for v in ("a", "floor", "d", "b") if v in a.variants]
        comp = [v for v in ("c_ro", "c_ma") if v in a.variants]
        first_nfe, other_nfes = a.nfe[0], a.nfe[1:]
        items = []
        for name in models:
            items += [(name, first_nfe, b, base) for b in a.batch]
        for name in models:
            for v in comp:  # the extreme batches first: they pay the two compiles, the others reuse
                order = [a.batch[0], a.batch[-1], *a.batch[1:-1]]
                items += [(name, first_nfe, b, [v]) for b in dict.fromkeys(order)]
        for name in models:
            for nfe in other_nfes:
                items += [(name, nfe, b, base) for b in a.batch]
        return items


def _eager_floor(model_low, case):
    x = case.noise.to(case.low)
    t = torch.full((case.batch,), 0.5)

    @torch.no_grad()
    def run():
        for _ in range(case.nfe):
            model_low.eps_and_head(x, t) if case.solver == "genie" else model_low(x, t)
    return run


def table(rows: list[dict]) -> str:
    """One line per (model, NFE, batch): medians, speedups of d, overhead, memory ratio."""
    by = {}
    for r in rows:
        if r.get("variant") == "precision":
            continue
        by.setdefault((r["model"], r["nfe"], r["batch"]), {})[r["variant"]] = r
    head = (f"{'model':>8} {'nfe':>3} {'B':>4} | {'a fp32':>9} {'b half':>9} {'c_ro':>9} {'c_ma':>9} "
            f"{'d engine':>9} {'floor':>9} | {'d/a':>6} {'d/b':>6} {'d/c':>6} {'ovh%':>6} {'alloc':>7} {'reserv':>7}")
    lines = ["times: median ms per whole sample (CUDA events); speedup = T_x / T_d; ovh = T_d/T_floor - 1; "
             "alloc, reserv = peak memory of d over b",
             head, "-" * len(head)]

    def med(d, v):
        r = d.get(v)
        return r.get("median_ms") if r else None

    def f(x, w=9, p=3):
        return f"{x:>{w}.{p}f}" if x is not None else f"{'-':>{w}}"
    for (model, nfe, b), d in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        ta, tb, tr, tm, td, tf = (med(d, v) for v in ("a", "b", "c_ro", "c_ma", "d", "floor"))
        tc = min([t for t in (tr, tm) if t is not None], default=None)
        sp = lambda t: (t / td) if (t is not None and td) else None  # noqa: E731
        ovh = (td / tf - 1) * 100 if (td and tf) else None
        def ratio(field):
            mb, md = (d.get("b") or {}).get("b_" + field), (d.get("d") or {}).get("d_" + field)
            return md / mb if (mb and md) else None
        mr, rr = ratio("peak_alloc_mib"), ratio("peak_reserved_mib")
        lines.append(f"{model:>8} {nfe:>3} {b:>4} | {f(ta)} {f(tb)} {f(tr)} {f(tm)} {f(td)} {f(tf)} | "
                     f"{f(sp(ta), 6, 2)} {f(sp(tb), 6, 2)} {f(sp(tc), 6, 2)} {f(ovh, 6, 1)} "
                     f"{f(mr, 7, 2)} {f(rr, 7, 2)}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["deep", "default"],
                   help="deep (DDPM++ deep CIFAR-10, random weights), default (shipped model), or a UNet config")
    p.add_argument("--solver", default="genie", choices=engine_mod.ENGINE_SOLVERS)
    p.add_argument("--nfe", type=int, nargs="+", default=[10, 5, 25])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--variants", nargs="+", default=["a", "b", "c_ro", "c_ma", "d", "floor"])
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    p.add_argument("--reps", type=int, default=5, help="timed calls at least (more while under --target-s)")
    p.add_argument("--target-s", type=float, default=1.0, help="timed seconds per variant aimed at")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=float(os.environ.get("BENCH_BUDGET_S", 3600)),
                   help="wall-clock budget; work beyond it is listed as skipped")
    p.add_argument("--compile-need-s", type=float, default=90.0,
                   help="budget a compiled baseline must have left to start (compiles cannot be stopped)")
    p.add_argument("--compile-on-cpu", action="store_true")
    p.add_argument("--autotune-convs", action="store_true",
                   help="let max-autotune benchmark Triton convolution templates too (minutes per batch "
                        "size on the deep U-Net); by default its convolutions stay on ATen/cuDNN")
    p.add_argument("--json", default=None, help="where the JSON rows go (default: print only)")
    p.add_argument("--smoke", action="store_true", help="CPU: tiny model, eager paths only, seconds")
    p.add_argument("--precision-only", action="store_true",
                   help="only the precision rows (engine in --dtype and bf16 against fp32), CPU or GPU, "
                        "at the first NFE and the largest batch up to 16")
    a = p.parse_args(argv)
    if any(b < 1 for b in a.batch) or any(n < 1 for n in a.nfe):
        p.error("batches and NFEs must be positive")

    if not CUDA and not a.smoke and not a.precision_only:
        print("bench_sample: no CUDA GPU here, so no latency benchmark (run with --smoke for a CPU smoke "
              "run of every code path, eager only)")
        return 0
    if a.smoke:
        a.models, a.batch, a.nfe = (["tiny"] if a.models == ["deep", "default"] else a.models), \
            (a.batch if a.batch != [1, 16, 64, 256] else [1, 2]), (a.nfe if a.nfe != [10, 5, 25] else [3])
        a.reps, a.target_s, a.warmup = 2, 0.0, 1
        if not CUDA and a.dtype == "fp16":
            a.dtype = "bf16"  # fp16 convolutions on the CPU are very slow
    low = torch.float16 if a.dtype == "fp16" else torch.bfloat16
    dev = torch.device("cuda" if CUDA else "cpu")
    if CUDA:
        torch.backends.cudnn.benchmark = False  # same algorithm choice for eager, graph and floor
    if not a.autotune_convs:
        import torch._inductor.config as inductor_config

        inductor_config.max_autotune_conv_backends = "ATEN"

    bench = Bench(a)
    bench.log(f"bench_sample: {json.dumps(bench.env)}")
    bench.log(f"plan: models={a.models} solver={a.solver} nfe={a.nfe} batch={a.batch} variants={a.variants} "
              f"dtype={a.dtype} budget={a.budget_s:.0f}s")
    models = load_models(a.models, bench.log)
    for name, m in models.items():
        bench.precision(name, m, a.nfe[0], min(16, max(a.batch)), dev, low)
    for name, nfe, batch, variants in ([] if a.precision_only else bench.plan(list(models))):
        case = Case(name, models[name], a.solver, nfe, batch, dev, low)
        case.outputs = bench.outputs.setdefault((name, nfe, batch), {})  # shared with later items
        bench.run_case(case, variants)
        if CUDA:
            models[name].cpu()  # (a) moved it to the GPU; keep memory probes clean
    out = {"env": bench.env, "args": vars(a), "rows": bench.rows, "skipped": bench.skipped,
           "wall_s": time.perf_counter() - bench.t_start}
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1, default=str)
        bench.log(f"wrote {a.json}")
    if bench.skipped:
        bench.log(f"skipped ({len(bench.skipped)}): " + "; ".join(bench.skipped))
    print()
    print(f"{bench.env['gpu']} | torch {bench.env['torch']} | triton {bench.env['triton']} | CUDA {bench.env['cuda']}")
    print(table(bench.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
