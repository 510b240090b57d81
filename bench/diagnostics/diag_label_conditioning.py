"""Does a class-conditional network use its labels? Label-embedding size and class accuracy.

Prints the norm of each row of the label embedding next to the norm of the time embedding (at
t = 0.5), and the class accuracy of conditional samples (our Fashion-MNIST classifier,
bench/results/quality/classifier.safetensors: top class == label asked for) at the given guidance scales:
n samples, labels 0..9 in turn, DPM-Solver++(2M), 10 logSNR steps, no AFS.

    python bench/diagnostics/diag_label_conditioning.py                          # the bundled model
    python bench/diagnostics/diag_label_conditioning.py --unet-ckpt runs/fmnist_cond2/ckpt.pt --scales 1,3
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model stem (default: bundled)")
    p.add_argument("--unet-ckpt", default=None, help="a training state's EMA network instead (head from --model)")
    p.add_argument("--scales", default="1,3")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import genie_fast
    from bench_guidance import load
    from bench_quality import get_classifier
    from genie_fast.models.unet import time_embedding

    model = load(args)
    unet = model.unet
    if not model.num_classes:
        raise SystemExit("the model is not class-conditional")
    with torch.no_grad():
        temb = unet.temb(time_embedding(torch.tensor([0.5]), unet.config.nf, unet.config.time_input))
        print(f"label embedding row norms {[round(v, 3) for v in unet.label_emb.weight.norm(dim=1).tolist()]}; "
              f"time embedding norm at t = 0.5: {float(temb.norm()):.3f}")
    clf, _ = get_classifier()
    noise = torch.randn(args.n, *model.image_shape, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(args.n) % model.num_classes
    for s in map(float, args.scales.split(",")):
        x, nfe = genie_fast.sample(model, noise=noise, solver="dpmpp_2m", steps=10, grid="logsnr", afs=False,
                                   labels=labels, guidance_scale=s)
        with torch.no_grad():
            pr = torch.softmax(clf(x.clamp(-1, 1)), 1)
        print(f"s={s}: accuracy {float((pr.argmax(1) == labels).float().mean()):.3f}, "
              f"mean top probability {float(pr.max(1).values.mean()):.3f} ({nfe} NFE per sample)")


if __name__ == "__main__":
    main()
