"""sample() from several Python threads against the same calls made one after another, on the
bundled model (the test suite runs the same check on a small random model: tests/test_bad_inputs.py,
test_sample_on_four_threads_equals_sequential_calls_bitwise).

    PYTHONPATH=. python bench/bench_threads.py --calls 24 --threads 4 --json bench/results/threads/threads.json

Each call has its own seed; solvers, labels and guidance scales vary from call to call (labels on the
bundled class-conditional model). torch runs one intra-op thread per call (torch.set_num_threads(1)),
so each call's float order is its own and the threaded results must equal the sequential ones
bitwise. One JSON row per configuration (printed, and written to --json): calls, threads, whether
every result was bitwise equal, the largest difference, and the wall times of both runs.
"""
from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

import genie_fast
from genie_fast.models import load_default

SOLVERS = ("genie", "ddim", "dpmpp_2m", "unipc", "heun", "genie_multistep")


def calls_for(n: int, model, labels: bool, nfe: int, batch: int) -> list[dict]:
    classes = int(getattr(model, "num_classes", 0) or 0)
    out = []
    for i in range(n):
        kw = dict(model=model, solver=SOLVERS[i % len(SOLVERS)], n=batch, nfe=nfe, seed=i)
        if labels and classes and i % 2:
            kw.update(labels=[(i + j) % classes for j in range(batch)], guidance_scale=1.0 + 0.5 * (i % 4))
        out.append(kw)
    return out


def run(calls: list[dict], threads: int) -> dict:
    t0 = time.perf_counter()
    want = [genie_fast.sample(**kw)[0] for kw in calls]
    t_seq = time.perf_counter() - t0
    order = list(np.random.default_rng(0).permutation(len(calls)))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        got = dict(zip(order, pool.map(lambda i: genie_fast.sample(**calls[i])[0], order)))
    t_thr = time.perf_counter() - t0
    diffs = [float((got[i] - w).abs().max()) for i, w in enumerate(want)]
    return {"calls": len(calls), "threads": threads, "bitwise_equal": all(torch.equal(got[i], w) for i, w in enumerate(want)),
            "max_abs_diff": max(diffs), "seconds_sequential": round(t_seq, 3), "seconds_threads": round(t_thr, 3)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=24)
    p.add_argument("--threads", default="4", help="comma-separated thread counts")
    p.add_argument("--nfe", type=int, default=5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = load_default().eval()
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        for labels in (False, True):
            row = {"model": "bundled", "labels": labels, "nfe": args.nfe, "batch": args.batch,
                   **run(calls_for(args.calls, model, labels, args.nfe, args.batch), threads)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        from pathlib import Path

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"env": {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "intra_op_threads": 1},
                       "rows": rows}, f, indent=1)
    return 0 if all(r["bitwise_equal"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
