"""Parameters (% of the U-Net) and CPU forward time (% of the U-Net forward) of every head candidate.

    ulimit -v 12000000; nice -n 10 .venv/bin/python bench/head_lab/timing.py [--batch 64 --repeats 15]

Like bench/bench_head_cost.py: 1 thread, batch 64, medians of interleaved repeats (U-Net forward,
then each head), the bundled U-Net with its real features (they come for free from its forward).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heads import CANDIDATES, build  # noqa: E402
from cache import ROOT, attach_extra_taps, attach_taps, load_model  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15)
    a = p.parse_args()
    torch.set_num_threads(1)
    model = load_model()
    unet = model.unet
    taps, _ = attach_taps(unet)
    extra, _ = attach_extra_taps(unet)
    x = torch.randn(a.batch, 1, 32, 32)
    t = torch.rand(a.batch) * 0.999 + 1e-3
    lab = torch.randint(0, 11, (a.batch,))
    with torch.no_grad():
        eps, feats, temb = unet(x, t, labels=lab, return_features=True)
    b = {"x_t": x, "eps": eps, "temb": temb, **{k: v.clone() for k, v in taps.items()},
         **{k: v.clone() for k, v in extra.items()}}
    heads = {n: build(n).eval() for n in CANDIDATES}
    times = {k: [] for k in ("unet", *heads)}
    with torch.no_grad():
        for _ in range(a.repeats + 2):
            t0 = time.perf_counter()
            unet(x, t, labels=lab)
            times["unet"].append(time.perf_counter() - t0)
            for n, h in heads.items():
                t0 = time.perf_counter()
                h(b)
                times[n].append(time.perf_counter() - t0)
    med = {k: statistics.median(v[2:]) for k, v in times.items()}
    n_unet = sum(q.numel() for q in unet.parameters())
    out = {"unet_params": n_unet, "unet_ms": med["unet"] * 1e3, "batch": a.batch, "threads": 1, "heads": {}}
    print(f"U-Net {n_unet:,} params, {med['unet'] * 1e3:.1f} ms")
    for n, h in heads.items():
        k = sum(q.numel() for q in h.parameters())
        out["heads"][n] = {"params": k, "params_pct": 100 * k / n_unet, "ms": med[n] * 1e3,
                           "time_pct": 100 * med[n] / med["unet"]}
        print(f"  {n:16s} {k:7,d} params ({100 * k / n_unet:4.1f}%)  {med[n] * 1e3:6.1f} ms = "
              f"{100 * med[n] / med['unet']:5.1f}%")
    (ROOT / "bench" / "results" / "head_lab").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "head_lab" / "timing.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
