"""Which blend share of the head is best for genie_multistep on the bundled model?

    python bench/diagnostics/diag_blend.py bench/results/grids_cond6/null.json [--head-errors 0,0.3,...]

genie_multistep weighs its head's derivative against the history's secants by the head's relative
error (`head_weight`); the model declares its measured error (0.535 for the bundled head). This runs
the solver with other values of head_error on the noise and the RK4 reference stored by
`bench/bench_grids.py` in the JSON given (same seed, labels and guidance), at NFE 5 / 10 / 15 on
the edm, logsnr and quadratic grids with AFS, and prints the median per-sample error and the RMSE.
A large head_error is the history form alone (the head only where there is no history yet).
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_grids import errors  # noqa: E402

import genie_fast  # noqa: E402
from genie_fast.models import load_default  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reference", help="a bench_grids.py JSON (its noise setting and RK4 reference)")
    p.add_argument("--head-errors", default="0,0.3,0.535,0.8,1.2,2,100")
    p.add_argument("--grids", default="edm,logsnr,quadratic")
    p.add_argument("--nfes", default="5,10,15")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with open(args.reference) as f:
        ref_run = json.load(f)
    s = ref_run["setting"]
    model = load_default()
    noise = torch.randn(s["n"], *model.image_shape, generator=torch.Generator().manual_seed(s["seed"]))
    labels = None if s["labels"] == "none" else torch.arange(s["n"]) % model.num_classes
    ref = torch.tensor(ref_run["ref_x0"])
    rows = []
    for grid in args.grids.split(","):
        for nfe in map(int, args.nfes.split(",")):
            for he in map(float, args.head_errors.split(",")):
                x0, used = genie_fast.sample(model, noise=noise, solver="genie_multistep", nfe=nfe, grid=grid,
                                             labels=labels, guidance_scale=s["guidance"], head_error=he)
                rmse, median = errors(x0, ref)
                rows.append({"grid": grid, "nfe": nfe, "head_error": he, "median": median, "rmse": rmse})
                print(json.dumps(rows[-1]), flush=True)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump({"setting": s, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
