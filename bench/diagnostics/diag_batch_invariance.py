"""How much does a sample change with the batch around it? (The batch-invariance figures of docs/guide.md, section 1.)

A sample's noise never depends on its batch (`seeds=`), so any difference between the same seed
sampled alone and inside a batch is the round-off of batched float32 network calls. For each solver:
seeds 0..max(batches)-1 sampled in batches of each size, and the largest absolute difference of
any of the first `--compare` samples against the same seed sampled alone (images in [-1, 1]; one
8-bit level is 2/255 = 7.8e-3).

    python bench/diagnostics/diag_batch_invariance.py --threads 2
    python bench/diagnostics/diag_batch_invariance.py --threads 1 --solvers dpmpp_2m --batches 7,64
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model stem (default: bundled)")
    p.add_argument("--solvers", default="genie,ddim,heun,dpmpp_2m,unipc,genie_exact")
    p.add_argument("--batches", default="7,64", help="batch sizes compared with batch 1")
    p.add_argument("--compare", type=int, default=4, help="samples per batch compared with their batch-1 run")
    p.add_argument("--nfe", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import genie_fast
    from genie_fast.models.default import load_default, load_model

    model = load_model(args.model) if args.model else load_default()
    batches = [int(b) for b in args.batches.split(",")]
    k = min([args.compare, *batches])
    print(f"model {args.model or 'bundled'}, {args.nfe} NFE, labels None, {args.threads} thread(s); "
          f"max |sample in batch b - same seed alone| over seeds 0..{k - 1}")
    print("| solver | " + " | ".join(f"batch {b}" for b in batches) + " |")
    print("|---|" + "---|" * len(batches))
    for solver in args.solvers.split(","):
        alone = torch.cat([genie_fast.sample(model, seeds=[s], solver=solver, nfe=args.nfe)[0] for s in range(k)])
        cells = []
        for b in batches:
            batch, _ = genie_fast.sample(model, seeds=range(b), solver=solver, nfe=args.nfe)
            cells.append(f"{(batch[:k] - alone).abs().max().item():.1e}")
        print(f"| {solver} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
