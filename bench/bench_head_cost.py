"""What a GENIE head costs next to its score network: parameters and CPU forward time.

    python bench/bench_head_cost.py [--config fmnist_small_lg] [--batch 64] [--threads 1]

Times are medians of interleaved repeats on this machine; compare the ratios, not the seconds.
"""
import argparse
import statistics
import time

import torch

from genie_fast.models.head import GenieHead, HeadConfig
from genie_fast.models.unet import UNet, count_parameters

HEADS = ((32, 1), (64, 1), (64, 2))  # (width, residual blocks); (nf, 1) is the paper's shape


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="fmnist_small_lg")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    unet = UNet(args.config).eval()
    c = unet.config
    x = torch.randn(args.batch, c.in_channels, c.image_size, c.image_size)
    t = torch.rand(args.batch) * 0.999 + 1e-3
    heads = {wb: GenieHead(HeadConfig.for_unet(unet, width=wb[0], num_res_blocks=wb[1])).eval() for wb in HEADS}
    times = {k: [] for k in ("unet", *HEADS)}
    with torch.no_grad():
        eps, feats, temb = unet(x, t, return_features=True)
        for _ in range(args.repeats + 2):  # the first two are warm-up
            t0 = time.perf_counter()
            unet(x, t)
            times["unet"].append(time.perf_counter() - t0)
            for wb, head in heads.items():
                t0 = time.perf_counter()
                head(x, eps, feats, temb)
                times[wb].append(time.perf_counter() - t0)
    med = {k: statistics.median(v[2:]) for k, v in times.items()}
    n_unet = count_parameters(unet)
    print(f"{args.config}: {n_unet:,} params, forward {med['unet'] * 1e3:.1f} ms at batch {args.batch}, "
          f"{args.threads} thread(s)")
    for wb, head in heads.items():
        n = count_parameters(head)
        print(f"  head width {wb[0]}, {wb[1]} block(s): {n:,} params ({n / n_unet:.1%}), "
              f"forward {med[wb] * 1e3:.1f} ms = {med[wb] / med['unet']:.1%} of the U-Net's")


if __name__ == "__main__":
    main()
