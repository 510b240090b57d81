"""The driver of the fused step-op benchmarks: each bench/bench_<op>.py is a spec (the op and
the roles of its tensor arguments) handed to `main`; the timers are shared with
bench_schedule_table.py.

CPU: the fused C++ op (functional and out=) against the eager PyTorch chain of the same math
(the op's `<op>_ref`), timed interleaved in one process so machine noise hits all alike; the
figure is the ratio of medians, at 64x3x32x32 fp32 for each --threads value. GPU (when present):
each backend's achieved bandwidth (bytes the op must read and write / time, CUDA events,
back-to-back launches) at batch 256 against a device-to-device copy moving the same bytes,
measured in the same run. Rows are appended as JSON lines keyed by device and versions.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import genie_fast
from genie_fast import ops
from genie_fast.schedule import VPSchedule, coeff_table, time_grid

RESULTS = Path(__file__).resolve().parent / "results" / "step_ops"


def environment(threads: int | None) -> dict:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "host_cpu": cpu, "cpu_count": os.cpu_count(), "threads": threads,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "torch": torch.__version__, "cuda": torch.version.cuda, "genie_fast": genie_fast.__version__,
           "python": platform.python_version()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def time_cpu(fns: dict, iters: int, repeats: int) -> dict:
    """Median and quartiles (us per call) of each fn, repeats interleaved across fns."""
    for f in fns.values():  # warm-up
        for _ in range(3):
            f()
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(iters):
                f()
            samples[k].append((time.perf_counter() - t0) / iters * 1e6)
    return {k: _stats(v) for k, v in samples.items()}


def time_cuda(fns: dict, iters: int, repeats: int) -> dict:
    """Median (us per call) of each fn launched `iters` times back to back, by CUDA events."""
    for f in fns.values():
        for _ in range(5):
            f()
    torch.cuda.synchronize()
    samples = {k: [] for k in fns}
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(repeats):
        for k, f in fns.items():
            start.record()
            for _ in range(iters):
                f()
            stop.record()
            stop.synchronize()
            samples[k].append(start.elapsed_time(stop) / iters * 1e3)
    return {k: _stats(v) for k, v in samples.items()}


def _stats(v):
    q = statistics.quantiles(v, n=4) if len(v) >= 4 else [min(v), statistics.median(v), max(v)]
    return {"median_us": statistics.median(v), "min_us": min(v), "q1_us": q[0], "q3_us": q[2], "n": len(v)}


def write_rows(op: str, rows: list[dict], out: Path | None):
    out = out or RESULTS / f"bench_{op}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"appended {len(rows)} rows to {out}")


def parse_args(doc: str):
    p = argparse.ArgumentParser(description=doc + "\n" + __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1],
                   help="CPU: torch.set_num_threads values (the dev machine: 2 cores, one busy)")
    p.add_argument("--shape", type=int, nargs="+", default=[64, 3, 32, 32], help="CPU shape (B C H W)")
    p.add_argument("--gpu-batch", type=int, default=256, help="GPU batch (C H W = 3 32 32)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", type=Path, default=None, help="JSON lines file (default bench/results/step_ops/bench_<op>.jsonl)")
    p.add_argument("--no-write", action="store_true")
    return p.parse_args()


# --------------------------------------------------------------------------- a step op from its spec

def make_args(roles, shape, net_dtype, device):
    """The op's tensor arguments, coeffs last: "state" a float32 state of `shape`, "net" a network
    output of `shape` in net_dtype, "head" a head output (B, 3C, ...) in net_dtype, "slots:K" K
    float32 states stacked (K, *shape) (a history), "weights:N" N float64 weights (a weight row);
    random, seed 0. coeffs: row 4 of a 10-step VP table."""
    s = VPSchedule()
    c = coeff_table(s, time_grid(s, 10))[4].to(device)
    g = torch.Generator(device=device).manual_seed(0)
    head_shape = (shape[0], 3 * shape[1], *shape[2:])
    args = []
    for role in roles:
        kind, _, count = role.partition(":")
        if role == "state":
            args.append(torch.randn(shape, generator=g, device=device))
        elif role == "net":
            args.append(torch.randn(shape, generator=g, device=device).to(net_dtype))
        elif role == "head":
            args.append(torch.randn(head_shape, generator=g, device=device).to(net_dtype))
        elif kind == "slots" and count.isdigit():
            args.append(torch.randn((int(count), *shape), generator=g, device=device))
        elif kind == "weights" and count.isdigit():
            args.append(torch.randn(int(count), generator=g, device=device, dtype=torch.float64))
        else:
            raise ValueError(f"unknown role {role!r}; choose state, net, head, slots:K or weights:N")
    return (*args, c)


def step_fns(op: str, args):
    """The eager chain, and makers of the fused calls (functional, out=) for a backend."""
    ref, fused_op = getattr(ops, f"{op}_ref"), getattr(ops, op)
    results = ref(*args)
    results = (results,) if isinstance(results, torch.Tensor) else tuple(results)

    def fused(backend):
        return lambda: fused_op(*args, backend=backend)

    def fused_out(backend):
        out = tuple(torch.empty_like(r) for r in results)
        out = out[0] if len(out) == 1 else out
        return lambda: fused_op(*args, backend=backend, out=out)

    # bytes one call must move: read every tensor argument but coeffs, write every result
    nbytes = sum(a.nbytes for a in args[:-1]) + sum(r.nbytes for r in results)
    return (lambda: ref(*args)), fused, fused_out, nbytes


def main(op: str, roles: tuple, doc: str):
    """Benchmark fused step `op`, whose tensor arguments before coeffs have `roles` (see make_args)."""
    args_ns = parse_args(doc)
    rows = []
    # ------------------------------------------------------------------ CPU: fused vs eager chain
    for threads in args_ns.threads:
        torch.set_num_threads(threads)
        eager, fused, fused_out, _ = step_fns(op, make_args(roles, tuple(args_ns.shape), torch.float32, "cpu"))
        fns = {"eager": eager, "cpp": fused("cpp"), "cpp_out": fused_out("cpp")}
        res = time_cpu(fns, args_ns.iters, args_ns.repeats)
        env = environment(threads)
        for name, r in res.items():
            rows.append({"op": op, "device": "cpu", "backend": name, "shape": list(args_ns.shape),
                         "net_dtype": "float32", **r, "speedup_vs_eager": res["eager"]["median_us"] / r["median_us"],
                         "speedup_vs_eager_min": res["eager"]["min_us"] / r["min_us"], **env})
        e = res["eager"]
        print(f"[cpu, {threads} thread(s), {tuple(args_ns.shape)} fp32] " + ", ".join(
            f"{k} median {v['median_us']:.1f} us (IQR {v['q1_us']:.1f}-{v['q3_us']:.1f}, min {v['min_us']:.1f})"
            for k, v in res.items()))
        f, o = res["cpp"], res["cpp_out"]
        print(f"  fused/eager speedup: functional {e['median_us'] / f['median_us']:.2f}x median,"
              f" {e['min_us'] / f['min_us']:.2f}x min; out= {e['median_us'] / o['median_us']:.2f}x"
              f" median, {e['min_us'] / o['min_us']:.2f}x min")
    # ------------------------------------------------------------------ GPU: bandwidth vs copy
    if not torch.cuda.is_available():
        print("no CUDA device: GPU bandwidth part skipped")
    else:
        shape = (args_ns.gpu_batch, 3, 32, 32)
        for net_dtype in (torch.float16, torch.bfloat16, torch.float32):
            eager, _, fused_out, nbytes = step_fns(op, make_args(roles, shape, net_dtype, "cuda"))
            src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
            dst = torch.empty_like(src)
            big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
            big_dst = torch.empty_like(big)
            fns = {"copy_same_bytes": lambda: dst.copy_(src), "eager": eager}
            for b in ("triton", "cuda"):
                if b in ops.available_backends(op, "cuda"):
                    fns[b] = fused_out(b)
            res = time_cuda(fns, args_ns.iters, args_ns.repeats)
            peak = time_cuda({"copy_1GiB": lambda: big_dst.copy_(big)}, 3, 10)["copy_1GiB"]
            del big, big_dst
            peak_gbs = 2 * (1 << 30) / peak["median_us"] / 1e3
            copy_gbs = nbytes / res["copy_same_bytes"]["median_us"] / 1e3
            env = environment(None)
            line = [f"[{env['gpu']}, {shape} {str(net_dtype)[6:]}] {nbytes / 1e6:.1f} MB moved;"
                    f" copy same bytes {copy_gbs:.0f} GB/s, copy 1 GiB {peak_gbs:.0f} GB/s"]
            for name, r in res.items():
                gbs = nbytes / r["median_us"] / 1e3
                rows.append({"op": op, "device": "cuda", "backend": name, "shape": list(shape),
                             "net_dtype": str(net_dtype)[6:], "bytes": nbytes, **r, "achieved_GBps": gbs,
                             "fraction_of_copy_same_bytes": gbs / copy_gbs, "copy_1GiB_GBps": peak_gbs, **env})
                if name != "copy_same_bytes":
                    line.append(f"  {name}: {r['median_us']:.1f} us, {gbs:.0f} GB/s = "
                                f"{100 * gbs / copy_gbs:.0f}% of copy (same bytes), "
                                f"{100 * gbs / peak_gbs:.0f}% of 1 GiB copy")
            print("\n".join(line))
    if not args_ns.no_write:
        write_rows(op, rows, args_ns.out)
    return rows
