"""Whole-sample latency of GENIE sampling: genie_fast's engine against eager and compiled loops.

One process, every baseline in the same run, on the DDPM++ "deep" CIFAR-10 U-Net (random
weights; timing only) and on the bundled default model:

  a     the official-style loop: eager fp32 network + head, Python loop, PyTorch update
        (the reference solver, backend "torch"; cuDNN's TF32 default left as PyTorch ships it)
  b     the same eager loop with an fp16 copy of the network and head
  c_ro  torch.compile(mode="reduce-overhead") of the fp16 step (network + head + update), Python loop
  c_ma  torch.compile(mode="max-autotune") of the same step
  d     genie_fast.engine.SamplingEngine: fp16, the whole loop replayed as one CUDA graph
  floor NFE back-to-back replays of a CUDA graph of ONE fp16 network (+ head for genie) forward

The plan, in order of value (each item starts only while --budget-s leaves it its need; what the
budget leaves out is listed as skipped). The main solver is the package's default
(genie_fast.solvers.DEFAULT_SOLVER, genie_multistep today):
  1. headline: the main solver, NFE 10, every model in --models, every batch in --batch (1 and
     64): a, floor, d, b
  2. c_ro of each model in --compile-models at --compile-batch (one compile per model)
  3. the engine (d) for every other solver of genie_fast.solvers.SOLVERS, first model, at
     --solver-batch, with an eps-only floor; a solver the engine refuses is a recorded skip
  4. --extra-batch (256): a, floor, d, b
  5. c_ma of each model in --compile-models at --compile-batch
  6. the other NFEs of --nfe, if asked for
  7. step op: the Triton genie_step op alone on a --step-op-batch x 3 x 32 x 32 state (fp16 network
     outputs), achieved GB/s against a device-to-device copy of the same bytes (CUDA events,
     back-to-back launches; the CUDA extension's op beside it where built); a skip row off a GPU
--rows headline runs item 1 only, --rows rest items 2 to 7, --rows all (the default) every item:
a short first call can take the headline, and `--rows rest --resume` on the same --json file
the rest later (a resumed run measures nothing the file already holds).

Each time is the median of whole-sample times taken with CUDA events after warm-up (capture and
compile times are reported apart), with min / max / interquartile spread. The engine is timed as
the other variants run, without its finiteness check (check_finite=False: a reduction and a
device-to-host sync inside the window, which the floor and the eager loops do not have); each
variant's result is checked finite once, after its timed calls (`finite` in its row). overhead = T_d / T_floor
- 1 (the floor scaled to the NFE d really used). Memory: peak of torch.cuda.max_memory_allocated
above the start (weights included; the graph pool's live blocks are allocations too) and of
max_memory_reserved, for b and d, each measured from a fresh model copy.

Output: --json FILE gets JSON Lines, written and flushed as each row is measured, so an interrupt
or a kill keeps every row so far: {"kind": "env"} (versions, the backend that runs each op), then
{"kind": "row"} per measurement and {"kind": "skip"} per item left out or refused, and
{"kind": "end"} (wall time, interrupted or not). Every row names the backend of each op for its
variant (`op_backends`). SIGINT (a step timeout) or SIGTERM stops the plan; the table of what was
measured is printed in every case. --resume FILE continues a file, skipping what it already holds.

    python bench/bench_sample.py --json out.jsonl      # GPU: the plan above within --budget-s
    python bench/bench_sample.py --rows headline --json out.jsonl          # item 1 only, then
    python bench/bench_sample.py --rows rest --resume --json out.jsonl     # the rest, same file
    python bench/bench_sample.py --smoke --json x.jsonl  # CPU: a tiny eager run of every path
    python bench/bench_sample.py --table out.jsonl     # the table of a (partial) run
    python bench/bench_sample.py --versions            # versions, op backends, NVTX emitter (JSON)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import inspect
import json
import os
import platform
import signal
import statistics
import sys
import time
import traceback


# --------------------------------------------------------------------------- reading a run (no torch)

def read_jsonl(path: str) -> list[dict]:
    """Every complete JSON line of `path` (a line cut by a kill is dropped)."""
    out = []
    if not path or not os.path.exists(path):
        return out
    with open(path) as fh:
        for line in fh:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


# --------------------------------------------------------------------------- table

def table(rows: list[dict]) -> str:
    """One line per (model, solver, NFE, batch): medians, speedups of d, overhead, memory ratio."""
    by, floors = {}, {}
    for r in rows:
        if r.get("kind", "row") not in ("row", "skip") or r.get("variant") in ("precision", STEP_OP_VARIANT):
            continue
        k = (r["model"], r["solver"], r["nfe"], r["batch"])
        by.setdefault(k, {})[r["variant"]] = r
        if r.get("kind", "row") == "row" and r["variant"] in ("floor", "floor_eps") and r.get("median_ms"):
            floors[(r["model"], r["nfe"], r["batch"], r.get("forward", "eps+head"))] = r["median_ms"]
    head = (f"{'model':>8} {'solver':>12} {'nfe':>3} {'B':>4} | {'a fp32':>9} {'b half':>9} {'c_ro':>9} "
            f"{'c_ma':>9} {'d engine':>9} {'floor':>9} | {'d/a':>6} {'d/b':>6} {'d/c':>6} {'ovh%':>6} "
            f"{'alloc':>6} {'reserv':>6} | d ops")
    lines = ["times: median ms per whole sample (CUDA events on a GPU); d/x = T_x / T_d (speedup of the "
             "engine); ovh = T_d / T_floor - 1; alloc, reserv = peak memory of d over b; "
             "'refused': the engine does not run that solver; '-': not measured",
             head, "-" * len(head)]

    def med(d, v):
        r = d.get(v)
        return r.get("median_ms") if r and r.get("kind", "row") == "row" else None

    def f(x, w=9, p=3):
        return f"{x:>{w}.{p}f}" if x is not None else f"{'-':>{w}}"
    for (model, solver, nfe, b), d in sorted(by.items()):
        ta, tb, tr, tm, td = (med(d, v) for v in ("a", "b", "c_ro", "c_ma", "d"))
        kind = "eps+head" if solver in _HEAD_SOLVER_NAMES else "eps"
        tf = med(d, "floor") if solver in _HEAD_SOLVER_NAMES else None
        tf = tf if tf is not None else floors.get((model, nfe, b, kind))
        nfe_used = (d.get("d") or {}).get("nfe_used") or nfe
        tc = min([t for t in (tr, tm) if t is not None], default=None)
        sp = lambda t: (t / td) if (t is not None and td) else None  # noqa: E731
        ovh = (td / (tf * nfe_used / nfe) - 1) * 100 if (td and tf) else None

        def ratio(field):
            mb, md = (d.get("b") or {}).get("b_" + field), (d.get("d") or {}).get("d_" + field)
            return md / mb if (mb and md) else None
        dcell = f(td)
        rd = d.get("d")
        if rd is not None and rd.get("kind") == "skip" and "refuses" in rd.get("reason", ""):
            dcell = f"{'refused':>9}"
        backs = (rd or {}).get("op_backends") or {}
        ops_note = ",".join(sorted(set(backs.values()))) if backs else ""
        lines.append(f"{model:>8} {solver:>12} {nfe:>3} {b:>4} | {f(ta)} {f(tb)} {f(tr)} {f(tm)} {dcell} {f(tf)} | "
                     f"{f(sp(ta), 6, 2)} {f(sp(tb), 6, 2)} {f(sp(tc), 6, 2)} {f(ovh, 6, 1)} "
                     f"{f(ratio('peak_alloc_mib'), 6, 2)} {f(ratio('peak_reserved_mib'), 6, 2)} | {ops_note}")
    for r in rows:
        if r.get("variant") == STEP_OP_VARIANT and r.get("kind", "row") == "row":
            lines.append(f"step op {r['solver']} {r.get('backend', 'triton')} B={r['batch']} {r.get('dtype')}: "
                         + (f"{r['median_us']:.1f} us, {r['GBps']:.0f} GB/s = {100 * r['fraction_of_copy']:.0f}% "
                            f"of a copy of the same bytes ({r['copy_GBps']:.0f} GB/s)"
                            if r.get("median_us") else f"ERROR {r.get('error')}"))
    bad = [r for r in rows if r.get("kind", "row") == "row" and r.get("finite") is False]
    if bad:
        lines.append("NON-FINITE results (timed all the same): " + "; ".join(
            f"{r['model']} {r['solver']} B={r['batch']} {r['variant']}" for r in bad))
    prec = [r for r in rows if r.get("variant") == "precision" and r.get("kind", "row") == "row"]
    if prec:
        lines.append("precision (engine vs fp32 eager, TF32 off): " + "; ".join(
            f"{r['model']} {r['solver']} {r['dtype']} {r['rel_l2_vs_fp32']:.1e}" for r in prec))
    return "\n".join(lines)


def print_table(rows, env):
    print()
    if env:
        print(f"{env.get('gpu')} | torch {env.get('torch')} | triton {env.get('triton')} | CUDA {env.get('cuda')} "
              f"| ops (auto): {env.get('op_backends_auto')} | NVTX: {(env.get('nvtx') or {}).get('emitter')}")
    print(table(rows))
    skipped = [r for r in rows if r.get("kind") == "skip"]
    if skipped:
        print(f"skipped ({len(skipped)}): " + "; ".join(
            f"{r['model']} {r['solver']} B={r['batch']} {r['variant']} ({r['reason']})" for r in skipped))


# solvers.HEAD_SOLVERS, named here so that the table (--table) runs without importing torch;
# checked against it below.
_HEAD_SOLVER_NAMES = ("genie", "genie_multistep")
# the variant name of the step-op bandwidth row (plan item 7)
STEP_OP_VARIANT = "step_op_bw"
STEP_OP = "genie_step"
ROWS = ("headline", "rest", "all")


def _table_cli(path: str) -> int:
    """Print the table of a (partial) run's JSON Lines file."""
    recs = read_jsonl(path)
    env = next((r for r in recs if r.get("kind") == "env"), None)
    print_table([r for r in recs if r.get("kind") in ("row", "skip")], env)
    if not any(r.get("kind") == "end" for r in recs):
        print("(the run wrote no end record: it was killed; the rows above are what it measured)")
    return 0


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--table":
    sys.exit(_table_cli(sys.argv[2]))  # the summary of gpu_check.sh: no torch import, a fraction of a second

import torch  # noqa: E402

import genie_fast  # noqa: E402
from genie_fast.devices import no_tf32  # noqa: E402
from genie_fast import ops, profiling  # noqa: E402
from genie_fast.engine import SamplingEngine  # noqa: E402
from genie_fast.models.head import GenieModel  # noqa: E402
from genie_fast.models.unet import UNet  # noqa: E402
from genie_fast.schedule import COL, coeff_table, time_grid  # noqa: E402
from genie_fast.solvers import DEFAULT_SOLVER, HEAD_SOLVERS, SOLVERS, nfe_of, steps_for_nfe  # noqa: E402

assert set(_HEAD_SOLVER_NAMES) == set(HEAD_SOLVERS), "update _HEAD_SOLVER_NAMES"

CUDA = torch.cuda.is_available()
MAIN_SOLVER = DEFAULT_SOLVER  # the headline rows follow the package's default solver


# --------------------------------------------------------------------------- environment

def fused_ops() -> list[str]:
    """The ops of genie_fast.ops that have a fused kernel (a Triton module in genie_fast.kernels or
    an op of genie_fast._C) and so dispatch on a backend; taylor_step stays a reference. Found
    without importing the Triton kernels (TRITON_INTERPRET must be set before that, in tests)."""
    import importlib.util

    from genie_fast import _ext

    candidates = [n for n in ops.__all__ if not n.endswith("_ref") and callable(getattr(ops, n, None))
                  and n != "available_backends" and "backend" in inspect.signature(getattr(ops, n)).parameters]
    kernel_files = set()
    try:
        spec = importlib.util.find_spec("genie_fast.kernels")
        for folder in (spec.submodule_search_locations or []) if spec else []:
            kernel_files |= {f[:-3] for f in os.listdir(folder) if f.endswith(".py")}
    except (ImportError, ValueError, OSError):
        pass
    fused = [n for n in candidates if n in kernel_files or _ext.has_op(n)]
    return fused or candidates  # nothing fused at all: every op is listed (and runs "torch")


def op_backends(device, backend: str | None = "auto") -> dict:
    """{op: the backend that runs it} for tensors on `device` and the `backend` asked for.

    backend None: the variant runs no step op (the floor); "inductor": the compiled reference.
    """
    dev = torch.device(device)
    out = {}
    for op in fused_ops():
        if backend is None:
            out[op] = "none"
        elif backend == "inductor":
            out[op] = "inductor (compiled reference)"
        else:
            try:
                out[op] = ops._pick(op, dev, backend)
            except (ValueError, RuntimeError) as e:
                out[op] = f"unavailable: {e}"
    return out


def versions() -> dict:
    dev = "cuda" if CUDA else "cpu"
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
        v["sm"] = f"{p.major}.{p.minor}"
    from genie_fast import _ext

    v["ext_loaded"] = _ext._C is not None
    if _ext._C is None:
        v["ext_error"] = str(getattr(_ext, "_load_error", None))
    v["ext_kernels"] = {op: [d for d in ("cpu", "cuda") if _ext.has_op(op, d)] for op in fused_ops()}
    v["device"] = dev
    v["op_backends_auto"] = op_backends(dev, "auto")
    v["fused"] = all(b != "torch" for b in v["op_backends_auto"].values())
    v["nvtx"] = profiling.emitter_info()
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
            except Exception as e:  # the default model may not be shipped
                log(f"[skip] default model not available: {type(e).__name__}: {e}")
        elif name == "deep":
            models[name] = random_genie("ddpmpp_deep_cifar10")
        else:
            models[name] = random_genie(name)
    return models


def converted_copy(model, device, dtype):
    """A copy of `model` on `device` in `dtype` (floating tensors only), eval, no gradients; the
    conversion goes tensor by tensor, so no full-precision copy lands on the device."""
    return copy.deepcopy(model).to(device=device, dtype=dtype).eval().requires_grad_(False)


def engine_sample(eng, noise, solver, nfe, check_finite: bool = True):
    """One engine call with the benchmark's fixed options (quadratic grid, no AFS, no denoising,
    the same as the eager baselines); returns (x0, nfe used). check_finite=False: no finiteness
    check (a reduction and a host sync), as the timed calls run it."""
    return eng.sample(noise, solver=solver, nfe=nfe, grid="quadratic", afs=False, denoise=False,
                      check_finite=check_finite)


# --------------------------------------------------------------------------- the variants

class Case:
    """One (model, solver, NFE, batch): noise, grid and the per-variant callables."""

    def __init__(self, name, model32, solver, nfe, batch, device, low):
        self.name, self.solver, self.nfe, self.batch, self.low = name, solver, nfe, batch, low
        self.model32 = model32
        self.schedule = model32.schedule
        self.ts = time_grid(self.schedule, steps_for_nfe(solver, nfe))
        g = torch.Generator().manual_seed(1234 + batch)
        self.noise = torch.randn((batch, *model32.image_shape), generator=g).to(device)
        self.outputs: dict[str, torch.Tensor] = {}

    # (a) and (b): the reference solver, eager, PyTorch update
    def eager_loop(self, model, dtype):
        x = self.noise.to(dtype)

        @torch.no_grad()
        def run():
            return SOLVERS[self.solver](model, x, self.ts, self.schedule, backend="torch")
        return run


def _forward(model_low, case, head: bool):
    x = case.noise.to(case.low)
    t = torch.full((case.batch,), 0.5, device=x.device)
    return (lambda: model_low.eps_and_head(x, t)) if head else (lambda: model_low(x, t))


def floor_graph(model_low, case: Case, head: bool):
    """A CUDA graph of one network (+ head) forward; floor = NFE back-to-back replays."""
    fwd = _forward(model_low, case, head)
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


def eager_floor(model_low, case, head: bool):
    fwd = _forward(model_low, case, head)

    @torch.no_grad()
    def run():
        for _ in range(case.nfe):
            fwd()
    return run


def compiled_step(model_low, mode: str):
    """torch.compile of the fp16 step (network + head + PyTorch GENIE update)."""
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


# --------------------------------------------------------------------------- output

class JsonLines:
    """Appends one JSON object per line, flushed and synced at once (a kill keeps every line)."""

    def __init__(self, path: str | None):
        self.path = path
        self.fh = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
            self.fh = open(path, "a")

    def write(self, obj: dict):
        if self.fh is None:
            return
        self.fh.write(json.dumps(obj, default=str) + "\n")
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self):
        if self.fh is not None:
            self.fh.close()


def item_key(model, solver, nfe, batch, variant) -> str:
    return f"{model}|{solver}|{nfe}|{batch}|{variant}"


# --------------------------------------------------------------------------- driver

class Bench:
    def __init__(self, args, writer: JsonLines, done: set | None = None):
        self.args = args
        self.writer = writer
        self.rows: list[dict] = []
        self.skipped: list[str] = []
        self.done = done or set()          # item keys already in a resumed file
        self.t_start = time.perf_counter()
        self.env = versions()
        self._compiled: dict = {}
        self.outputs: dict = {}

    def log(self, msg):
        print(msg, flush=True)

    def left_s(self):
        return self.args.budget_s - (time.perf_counter() - self.t_start)

    def skip(self, case_or_fields, variant: str, reason: str):
        f = case_or_fields if isinstance(case_or_fields, dict) else {
            "model": case_or_fields.name, "solver": case_or_fields.solver, "nfe": case_or_fields.nfe,
            "batch": case_or_fields.batch}
        rec = {"kind": "skip", **f, "variant": variant, "reason": reason}
        self.skipped.append(f"{f['model']} {f['solver']} nfe={f['nfe']} B={f['batch']} {variant} ({reason})")
        self.rows.append(rec)
        self.writer.write(rec)

    def row(self, case: Case, variant: str, backend, **fields):
        r = {"kind": "row", "model": case.name, "solver": case.solver, "nfe": case.nfe, "batch": case.batch,
             "dtype": "float32" if variant == "a" else str(case.low).replace("torch.", ""), "variant": variant,
             "device": str(case.noise.device), "op_backends": op_backends(case.noise.device, backend),
             "gpu": self.env["gpu"], "torch": self.env["torch"], "triton": self.env["triton"],
             "cuda": self.env["cuda"], "nvtx": self.env["nvtx"]["emitter"], **fields}
        self.rows.append(r)
        self.writer.write(r)
        med = fields.get("median_ms")
        self.log(f"  {case.name:>8} {case.solver:>12} nfe={case.nfe:<3} B={case.batch:<4} {variant:<6} "
                 + (f"median {med:9.3f} ms  [{fields['min_ms']:.3f}, {fields['max_ms']:.3f}]  n={fields['reps']}"
                    if med is not None else f"ERROR {fields.get('error')}")
                 + (f"  setup {fields['setup_s']:.1f}s" if fields.get("setup_s") else "")
                 + (f"  vs a {fields['rel_l2_vs_a']:.1e}" if fields.get("rel_l2_vs_a") is not None else ""))
        return r

    def measure(self, case: Case, variant: str, make, need_s: float, backend="auto", **extra):
        """Set up (timed apart), warm up, time. Any failure is recorded, never fatal; an interrupt
        (KeyboardInterrupt) propagates to stop the plan."""
        if item_key(case.name, case.solver, case.nfe, case.batch, variant) in self.done:
            return None
        if self.left_s() < need_s:
            self.skip(case, variant, "budget")
            return None
        try:
            t0 = time.perf_counter()
            fn = make()
            out = fn()  # first call: capture / compile / cuDNN autotune
            if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], int):
                extra["nfe_used"] = out[1]
            sync()
            setup_s = time.perf_counter() - t0
            for _ in range(self.args.warmup):
                fn()
            sync()
            times = time_calls(fn, self.args.reps, self.args.target_s)
            out = fn()
            out = out[0] if isinstance(out, tuple) else out
            if isinstance(out, torch.Tensor):  # checked once, outside the timed window
                extra["finite"] = bool(torch.isfinite(out).all())
                if not extra["finite"]:
                    self.log(f"  WARNING: {case.name} {case.solver} B={case.batch} {variant}: non-finite result")
                case.outputs[variant] = out.detach().float().cpu()
                ref = case.outputs.get("a")
                if ref is not None and variant != "a":
                    extra["rel_l2_vs_a"] = float((case.outputs[variant] - ref).norm() / ref.norm())
            return self.row(case, variant, backend, setup_s=setup_s, **summary(times), **extra)
        except Exception as e:
            self.log(traceback.format_exc(limit=3))
            return self.row(case, variant, backend, median_ms=None, error=f"{type(e).__name__}: {str(e)[:300]}")
        finally:
            if CUDA:
                gc.collect()
                torch.cuda.empty_cache()

    def run_case(self, case: Case, variants: list[str]):
        todo = [v for v in variants if item_key(case.name, case.solver, case.nfe, case.batch, v) not in self.done]
        if not todo:
            return {}
        self.log(f"-- {case.name} {case.solver} nfe={case.nfe} batch={case.batch} {todo} "
                 f"({self.left_s():.0f}s of budget left)")
        low, model32, dev = case.low, case.model32, case.noise.device
        need = {"a": 5, "b": 5, "d": 8, "floor": 5, "floor_eps": 5, "c_ro": self.args.compile_need_s,
                "c_ma": self.args.compile_need_s}
        mem, results = {}, {}
        for v in todo:
            if v == "a":
                m32 = model32.to(dev)
                results[v] = self.measure(case, "a", lambda: case.eager_loop(m32, torch.float32), need[v],
                                          backend="torch")
                model32.cpu()  # off the GPU again before the memory probes of b and d
                del m32
            elif v == "b":
                with memory_probe(mem, "b"):
                    m16 = converted_copy(model32, dev, low)
                    results[v] = self.measure(case, "b", lambda: case.eager_loop(m16, low), need[v],
                                              backend="torch")
                del m16
            elif v == "d":
                eng = None
                # a half-precision network is for GPUs (the engine may refuse one on the CPU)
                eng_dtype = low if CUDA else torch.float32
                with memory_probe(mem, "d"):
                    try:
                        eng = SamplingEngine(model32, device=dev, net_dtype=eng_dtype, max_graphs=1)
                    except Exception as e:
                        results[v] = self.row(case, "d", None, median_ms=None,
                                              error=f"{type(e).__name__}: {str(e)[:300]}")
                    if eng is not None:
                        results[v] = self.measure(  # timed without the engine's finiteness check
                            case, "d", lambda: (lambda: engine_sample(eng, case.noise, case.solver, case.nfe,
                                                                      check_finite=False)),
                            need[v], backend=eng.backend, dtype=str(eng_dtype).replace("torch.", ""))
                if eng is not None and results.get(v) is not None and results[v].get("median_ms") is not None:
                    info = eng.cache_info()
                    results[v].update(capture_ms=info.get("capture_ms_total"), engine=info,
                                      graph=bool(info.get("graphs")))
                del eng
            elif v in ("floor", "floor_eps"):
                head = v == "floor" and case.solver in HEAD_SOLVERS
                m16 = converted_copy(model32, dev, low)
                holder = {}

                def make_floor():
                    if not CUDA:
                        return eager_floor(m16, case, head)
                    holder["run"], holder["graph"] = floor_graph(m16, case, head)
                    return holder["run"]
                results[v] = self.measure(case, v, make_floor, need[v], backend=None,
                                          forward="eps+head" if head else "eps")
                holder.clear()
                del m16
            elif v in ("c_ro", "c_ma"):
                if not CUDA and not self.args.compile_on_cpu:
                    self.skip(case, v, "CPU run")
                    continue
                if case.solver != "genie":
                    self.skip(case, v, f"the compiled baseline is written for genie, not {case.solver}")
                    continue
                mode = "reduce-overhead" if v == "c_ro" else "max-autotune"
                if self.left_s() < need[v]:
                    self.skip(case, v, "budget")
                    continue
                if (case.name, v) not in self._compiled:  # one compiled step per model and mode
                    self._compiled.clear()
                    torch._dynamo.reset()
                    m16 = converted_copy(model32, dev, low)
                    self._compiled[(case.name, v)] = (m16, compiled_step(m16, mode))
                cstep = self._compiled[(case.name, v)][1]
                results[v] = self.measure(case, v, lambda: compiled_loop(cstep, case, mode), need[v],
                                          backend="inductor",
                                          compile_note="setup_s = compile + cudagraph record")
        if mem:
            for v in ("b", "d"):
                if results.get(v) is not None:
                    results[v].update({k: val for k, val in mem.items() if k.startswith(v + "_")})
                    self.writer.write({"kind": "memory", "model": case.name, "solver": case.solver,
                                       "nfe": case.nfe, "batch": case.batch, "variant": v,
                                       **{k: val for k, val in mem.items() if k.startswith(v + "_")}})
            self.log("     memory MiB: " + ", ".join(f"{k}={val:.0f}" for k, val in mem.items()))
        return results

    def precision(self, name, model32, solver, nfe, batch, dev, low):
        """x0 of the engine (low precision, graph on CUDA) against fp32 eager with TF32 off."""
        fields = {"model": name, "solver": solver, "nfe": nfe, "batch": batch}
        if self.left_s() < 20:
            self.skip(fields, "precision", "budget")
            return
        g = torch.Generator().manual_seed(99)
        z = torch.randn((batch, *model32.image_shape), generator=g).to(dev)
        try:
            with no_tf32():
                ref, _ = engine_sample(SamplingEngine(model32, device=dev, net_dtype=torch.float32, use_graphs=False), z, solver, nfe)
                for dt in (low, torch.bfloat16) if low != torch.bfloat16 else (low,):
                    try:
                        x, _ = engine_sample(SamplingEngine(model32, device=dev, net_dtype=dt), z, solver, nfe)
                    except (ValueError, TypeError) as e:
                        if CUDA:
                            raise
                        self.skip(fields, "precision", f"{dt} on the CPU: {type(e).__name__}: {str(e)[:200]}")
                        continue
                    err = float((x.double() - ref.double()).norm() / ref.double().norm())
                    rec = {"kind": "row", **fields, "variant": "precision", "dtype": str(dt).replace("torch.", ""),
                           "rel_l2_vs_fp32": err, "graph": CUDA, "gpu": self.env["gpu"],
                           "op_backends": op_backends(dev, "auto")}
                    self.rows.append(rec)
                    self.writer.write(rec)
                    self.log(f"  precision {name} {solver} nfe={nfe} B={batch} {dt}: "
                             f"rel L2 vs fp32 (TF32 off) = {err:.2e}")
        except Exception as e:
            self.log(f"  precision {name} {solver}: ERROR {type(e).__name__}: {e}")
            self.skip(fields, "precision", f"error: {type(e).__name__}: {str(e)[:200]}")
        finally:
            gc.collect()
            if CUDA:
                torch.cuda.empty_cache()

    def step_op_bandwidth(self, batch: int, device="cuda"):
        """Plan item 7: the Triton genie_step op alone on a (batch, 3, 32, 32) float32 state with
        network outputs in the run's dtype, CUDA events over back-to-back launches, against a
        device-to-device copy of the same bytes (and the CUDA extension's op where built). A skip
        row where it cannot run (no GPU, no Triton). (device: "cuda"; the CPU only in a test, under
        Triton's interpreter, with perf_counter clocks.)"""
        fields = {"model": "step_op", "solver": STEP_OP, "nfe": 0, "batch": batch}
        if item_key(*fields.values(), STEP_OP_VARIANT) in self.done:
            return None
        if not CUDA:
            self.skip(fields, STEP_OP_VARIANT, "no CUDA GPU: the Triton step op is timed on a GPU only")
            return None
        if "triton" not in ops.available_backends(STEP_OP, device):
            self.skip(fields, STEP_OP_VARIANT, "Triton cannot run genie_step here (not installed or no GPU "
                                               "backend)")
            return None
        if self.left_s() < 10:
            self.skip(fields, STEP_OP_VARIANT, "budget")
            return None
        here = os.path.dirname(os.path.abspath(__file__))  # bench/ (not on sys.path when imported)
        if here not in sys.path:
            sys.path.append(here)
        import _step_bench

        low = torch.float16 if self.args.dtype == "fp16" else torch.bfloat16
        shape = (batch, 3, 32, 32)
        rec = {"kind": "row", **fields, "variant": STEP_OP_VARIANT, "backend": "triton",
               "dtype": str(low).replace("torch.", ""), "shape": list(shape), "gpu": self.env["gpu"],
               "torch": self.env["torch"], "triton": self.env["triton"], "cuda": self.env["cuda"]}
        try:
            args = _step_bench.make_args(("state", "net", "head"), shape, low, device)
            _, _, fused_out, nbytes = _step_bench.step_fns(STEP_OP, args)
            src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            fns = {"triton": fused_out("triton"), "copy": lambda: dst.copy_(src)}
            if "cuda" in ops.available_backends(STEP_OP, device):
                fns["cuda"] = fused_out("cuda")
            if torch.device(device).type == "cuda":
                res = _step_bench.time_cuda(fns, iters=20, repeats=10)
            else:
                res = _step_bench.time_cpu(fns, iters=1, repeats=2)
            gbps = {k: nbytes / r["median_us"] / 1e3 for k, r in res.items()}
            rec.update(bytes=nbytes, median_us=res["triton"]["median_us"], min_us=res["triton"]["min_us"],
                       GBps=gbps["triton"], copy_GBps=gbps["copy"], fraction_of_copy=gbps["triton"] / gbps["copy"],
                       cuda_ext_GBps=gbps.get("cuda"))
            self.log(f"  step op {STEP_OP} triton {shape} {rec['dtype']}: {rec['median_us']:.1f} us, "
                     f"{gbps['triton']:.0f} GB/s (copy of the same bytes {gbps['copy']:.0f} GB/s"
                     + (f", CUDA extension {gbps['cuda']:.0f} GB/s)" if "cuda" in gbps else ")"))
        except Exception as e:
            self.log(traceback.format_exc(limit=3))
            rec.update(median_us=None, error=f"{type(e).__name__}: {str(e)[:300]}")
        finally:
            gc.collect()
            if CUDA:
                torch.cuda.empty_cache()
        self.rows.append(rec)
        self.writer.write(rec)
        return rec

    def plan(self, models: list[str], rows: str = "all") -> list[tuple]:
        """(model, solver, nfe, batch, variants) in order of value; see the module docstring.
        rows: "headline" (item 1), "rest" (items 2 to 6; item 7, the step op, is no Case and runs
        after them in main) or "all"."""
        if rows not in ROWS:
            raise ValueError(f"rows must be one of {ROWS}, got {rows!r}")
        a = self.args
        base = [v for v in ("a", "floor", "d", "b") if v in a.variants]
        nfe = a.nfe[0]
        headline, items = [], []
        for name in models:                                            # 1. headline
            headline += [(name, MAIN_SOLVER, nfe, b, base) for b in a.batch]
        comp_models = [m for m in a.compile_models if m in models]
        if "c_ro" in a.variants:                                       # 2. reduce-overhead
            items += [(m, MAIN_SOLVER, nfe, a.compile_batch, ["c_ro"]) for m in comp_models]
        if models and "d" in a.variants:                               # 3. every other solver
            others = [s for s in a.solvers if s != MAIN_SOLVER]
            first = True
            for s in others:
                vs = ["d"] + (["floor_eps"] if first and "floor" in a.variants else [])
                items.append((models[0], s, nfe, a.solver_batch, vs))
                first = False
        for name in models:                                            # 4. extra batches
            items += [(name, MAIN_SOLVER, nfe, b, base) for b in a.extra_batch if b not in a.batch]
        if "c_ma" in a.variants:                                       # 5. max-autotune
            items += [(m, MAIN_SOLVER, nfe, a.compile_batch, ["c_ma"]) for m in comp_models]
        for extra_nfe in a.nfe[1:]:                                    # 6. other NFEs, if asked for
            for name in models:
                items += [(name, MAIN_SOLVER, extra_nfe, b, base) for b in a.batch]
        headline = [it for it in headline if it[4]]
        items = [it for it in items if it[4]]
        return {"headline": headline, "rest": items, "all": headline + items}[rows]


# --------------------------------------------------------------------------- main

def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["deep", "default"],
                   help="deep (DDPM++ deep CIFAR-10, random weights), default (bundled model), or a UNet config")
    p.add_argument("--solvers", nargs="+", default=["all"],
                   help="solvers whose engine rows (and precision rows) are measured; 'all': genie_fast.solvers.SOLVERS")
    p.add_argument("--nfe", type=int, nargs="+", default=[10], help="the first is the plan's; others come last")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64], help="headline batches")
    p.add_argument("--extra-batch", type=int, nargs="*", default=[256], help="batches if time is left")
    p.add_argument("--solver-batch", type=int, default=64, help="batch of the other solvers' engine rows")
    p.add_argument("--compile-batch", type=int, default=64, help="the one batch of the compiled baselines")
    p.add_argument("--compile-models", nargs="*", default=["default", "deep"],
                   help="models of the compiled baselines, in order (the bundled model compiles fastest)")
    p.add_argument("--variants", nargs="+", default=["a", "b", "c_ro", "c_ma", "d", "floor"])
    p.add_argument("--rows", default="all", choices=ROWS,
                   help="headline: plan item 1 only (the main solver at NFE 10, --models x --batch: a, b, d, "
                        "floor); rest: items 2 to 7 (compiled baselines, other solvers, extra batches and "
                        "NFEs, the Triton step-op bandwidth row); all: every item. Use --resume to add "
                        "the rest to a headline file")
    p.add_argument("--step-op-batch", type=int, default=2048,
                   help="batch of the step-op bandwidth row's (B, 3, 32, 32) state")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    p.add_argument("--reps", type=int, default=5, help="timed calls at least (more while under --target-s)")
    p.add_argument("--target-s", type=float, default=0.5, help="timed seconds per variant aimed at")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=float(os.environ.get("BENCH_BUDGET_S", 3600)),
                   help="wall-clock budget; work beyond it is listed as skipped")
    p.add_argument("--compile-need-s", type=float, default=40.0,
                   help="budget a compiled baseline must have left to start (compiles cannot be stopped)")
    p.add_argument("--compile-on-cpu", action="store_true")
    p.add_argument("--autotune-convs", action="store_true",
                   help="let max-autotune benchmark Triton convolution templates too (minutes per batch "
                        "size on the deep U-Net); by default its convolutions stay on ATen/cuDNN")
    p.add_argument("--json", default=None, help="JSON Lines file the rows are appended to as they are measured")
    p.add_argument("--resume", action="store_true",
                   help="continue --json: items it already holds (rows, refusals) are not measured again")
    p.add_argument("--smoke", action="store_true", help="CPU: tiny model, eager paths only, seconds")
    p.add_argument("--precision-only", action="store_true",
                   help="only the precision rows (engine in --dtype and bf16 against fp32) for every solver of "
                        "--solvers, CPU or GPU, at the first NFE and the largest batch up to 16")
    p.add_argument("--table", metavar="JSONL", help="print the table of a (partial) run's file and exit")
    p.add_argument("--versions", action="store_true", help="print versions, op backends and NVTX emitter (JSON)")
    a = p.parse_args(argv)

    if a.table:
        return _table_cli(a.table)
    if a.versions:
        print(json.dumps(versions(), indent=1, default=str))
        return 0
    if any(b < 1 for b in [*a.batch, *a.extra_batch, a.solver_batch, a.compile_batch, a.step_op_batch]) \
            or any(n < 1 for n in a.nfe):
        p.error("batches and NFEs must be positive")
    a.solvers = list(SOLVERS) if a.solvers == ["all"] else a.solvers
    unknown = [s for s in a.solvers if s not in SOLVERS]
    if unknown:
        p.error(f"unknown solvers {unknown}; known: {sorted(SOLVERS)}")

    if not CUDA and not a.smoke and not a.precision_only:
        print("bench_sample: no CUDA GPU here, so no latency benchmark (run with --smoke for a CPU smoke "
              "run of every code path, eager only)")
        return 0
    if a.smoke:
        a.models = ["tiny"] if a.models == ["deep", "default"] else a.models
        a.batch = [1, 2] if a.batch == [1, 64] else a.batch
        a.extra_batch, a.solver_batch, a.compile_batch = [], 2, 2
        a.compile_models = a.models
        if a.nfe == [10]:  # the fewest NFE that give every solver one step (genie_exact's JVP costs more)
            a.nfe = [max([3] + [nfe_of(s, 1) for s in a.solvers])]
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

    done = set()
    if a.resume and a.json:
        for r in read_jsonl(a.json):
            if r.get("kind") == "row" or (r.get("kind") == "skip" and "refuses" in r.get("reason", "")):
                done.add(item_key(r["model"], r["solver"], r["nfe"], r["batch"], r["variant"]))
    elif a.json and os.path.exists(a.json):
        os.remove(a.json)
    writer = JsonLines(a.json)
    # SIGINT (a step timeout) and SIGTERM stop the plan and keep the table; set explicitly, since a
    # process started in the background of a non-interactive shell inherits SIGINT as ignored
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, _raise_interrupt)
    bench = Bench(a, writer, done)
    writer.write({"kind": "env", **bench.env, "args": vars(a), "resumed": bool(done)})
    bench.log(f"bench_sample: {json.dumps(bench.env, default=str)}")
    if CUDA and not bench.env["fused"]:
        bench.log(f"WARNING: some ops run the PyTorch reference on the GPU (unfused): {bench.env['op_backends_auto']}")
    interrupted = False
    try:
        bench.log(f"plan ({a.rows} rows): models={a.models} solvers={a.solvers} nfe={a.nfe} batch={a.batch} "
                  f"extra_batch={a.extra_batch} variants={a.variants} dtype={a.dtype} budget={a.budget_s:.0f}s"
                  + (f" (resuming: {len(done)} items done)" if done else ""))
        models = load_models(a.models, bench.log)
        if a.precision_only:
            for name, m in models.items():
                for s in a.solvers:
                    bench.precision(name, m, s, a.nfe[0], min(16, max(a.batch)), dev, low)
        else:
            for name, solver, nfe, batch, variants in bench.plan(list(models), a.rows):
                fields = {"model": name, "solver": solver, "nfe": nfe, "batch": batch}
                if steps_for_nfe(solver, nfe) < 1:
                    for v in variants:
                        bench.skip(fields, v, f"nfe={nfe} is less than one {solver} step")
                    continue
                try:
                    case = Case(name, models[name], solver, nfe, batch, dev, low)
                except Exception as e:  # one item's set-up must not end the plan
                    for v in variants:
                        bench.skip(fields, v, f"set-up failed: {type(e).__name__}: {str(e)[:200]}")
                    continue
                case.outputs = bench.outputs.setdefault((name, solver, nfe, batch), {})
                bench.run_case(case, variants)
                if CUDA:
                    models[name].cpu()  # (a) moved it to the GPU; keep memory probes clean
            if a.rows in ("rest", "all"):                              # 7. the step op, last
                bench.step_op_bandwidth(a.step_op_batch)
    except KeyboardInterrupt as e:
        interrupted = True
        bench.log(f"bench_sample: interrupted ({e or 'SIGINT'}) after {time.perf_counter() - bench.t_start:.0f}s: "
                  f"the rows so far are kept")
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        writer.write({"kind": "end", "wall_s": time.perf_counter() - bench.t_start, "interrupted": interrupted,
                      "skipped": bench.skipped})
        writer.close()
        if a.json:
            bench.log(f"rows in {a.json}")
        rows = bench.rows
        if done:
            rows = [r for r in read_jsonl(a.json) if r.get("kind") in ("row", "skip")]
        print_table(rows, bench.env)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
