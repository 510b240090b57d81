"""Distil a GENIE head for a diffusers UNet2DModel or UNet2DConditionModel: ``genie-fast distill --diffusers DIR``.

The same loss as the bundled model's head (``genie_fast.training.distill.head_loss``: gamma^2 || k_psi -
d eps/d gamma ||^2 along the DDIM ODE, the head fed the network's own eps), with x_t = alpha_t x_0 +
sigma_t z, t ~ U[1/N, 1]. The target is by default the secant (``--target secant``, ``DIFFUSERS_TARGET``):
d eps/d gamma as a central difference along the ODE over ``--span-t`` (0.01: 10 timesteps of 1000),
not the exact JVP (``--target jvp``): a UNet trained at integer timesteps wiggles in t between them,
the exact derivative is dominated by that wiggle, and a head distilled on it learned nothing
(bench/RESULTS.md, issue 13). x_0 comes from

* ``--data PATH``: a folder of images (PNG/JPEG/..., converted to the UNet's channels and resized
  to its sample size) or an ``.npz`` of uint8 NHWC images under ``arr_0`` (labels under ``arr_1``),
  the layout ``genie-fast generate`` writes;
* nothing (data-free): ``--pool`` samples of the model itself, drawn once with ``dpmpp_2m`` at
  ``--pool-nfe`` evaluations and kept in ``<out>/pool.pt`` so a resumed run reuses them.

The run folder ``--out`` holds ``ckpt.pt`` (head, EMA head, optimiser, step; ``--resume`` continues
it), ``run.json`` and ``log.txt``. At the end the EMA head is written beside the model as
``DIR/genie_head.safetensors`` + ``.json`` (``--head-out`` elsewhere), which
``from_diffusers(..., head_path=)`` and ``load_diffusers(DIR)`` pick up.

A conditional UNet (UNet2DConditionModel, e.g. text embeddings through cross-attention, in a VAE's
latent space: the pool is then of latents) is distilled along the ODEs of its conditioning:
``--cond FILE.npz`` (one array per input name, one row per data image or pool sample, or one row)
and ``--negative-cond FILE.npz`` (the negative branch, e.g. the empty prompt, taken at
``--label-dropout`` per sample: guidance mixes the heads of both branches).

    genie-fast distill --diffusers my_model --out my_model/genie_distill --steps 2000 [--data imgs/] [--resume]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..checks import check_int, require
from ..data import infinite_batches
from ..files import from_uint8, weights_hash
from ..models.diffusers import DiffusersGenieModel, load_diffusers, load_head, save_head
from ..models.diffusers import _stem as _head_stem
from ..models.head import GenieHead, HeadConfig
from ..models.unet import count_parameters
from .distill import check_distill_args, check_resumed_target, check_span_t, head_state, train_head
from .run import DISTILL_KEYS, jsonable_args, load_checkpoint, open_run_log, save_checkpoint

__all__ = ["add_diffusers_args", "distill_diffusers", "load_images", "model_pool"]

# The distillation target of ``distill --diffusers`` when --target is not given (see the module doc).
DIFFUSERS_TARGET = "secant"

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def add_diffusers_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("diffusers models (genie_fast.distill_diffusers)")
    g.add_argument("--diffusers", default=None, metavar="DIR",
                   help="distil a head for the diffusers UNet2DModel or UNet2DConditionModel (with --cond) saved "
                        "in DIR (pipeline folder with unet/ and scheduler/, or a UNet folder with "
                        "scheduler_config.json); --unet-ckpt is then unused")
    g.add_argument("--data", default=None, metavar="PATH",
                   help="--diffusers: a folder of images or an .npz (uint8 NHWC arr_0); default: data-free, "
                        "from the model's own samples")
    g.add_argument("--pool", type=int, default=1024, help="--diffusers, data-free: number of model samples")
    g.add_argument("--pool-nfe", type=int, default=50, help="--diffusers, data-free: dpmpp_2m NFE per sample")
    g.add_argument("--head-out", default=None, metavar="STEM",
                   help="--diffusers: where the head goes (default DIR/genie_head)")
    g.add_argument("--cond", default=None, metavar="FILE.npz",
                   help="--diffusers, a conditional UNet (UNet2DConditionModel): its inputs (e.g. "
                        "encoder_hidden_states), one array per name, one row per data image (or pool sample) or "
                        "one row for all")
    g.add_argument("--negative-cond", default=None, metavar="FILE.npz",
                   help="--diffusers with --cond: the negative branch's inputs (e.g. the empty prompt's "
                        "embeddings), distilled at --label-dropout so the head serves both branches of guidance")


def load_images(path, image_shape) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x0 (N, C, H, W) float32 in [-1, 1], labels (N,) or None) from a folder of images or an .npz."""
    c, h, w = image_shape
    path = Path(path)
    labels = None
    if path.suffix == ".npz":
        with np.load(path) as f:
            if "arr_0" not in f:
                raise ValueError(f"{path}: no arr_0 (uint8 NHWC images)")
            images = f["arr_0"]
            labels = torch.from_numpy(f["arr_1"].astype(np.int64)) if "arr_1" in f else None
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"{path}: arr_0 must be uint8 NHWC, got {images.dtype} of shape {images.shape}")
        if images.shape[3] == 3 and c == 1:
            images = images[..., :1]  # gray images stored as RGB (the FID layout)
    elif path.is_dir():
        from PIL import Image

        files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)})")
        rows = []
        for f in files:
            with Image.open(f) as im:
                im = im.convert("L" if c == 1 else "RGB")
                if im.size != (w, h):
                    side = min(im.size)  # center crop to a square, then resize
                    left, top = (im.width - side) // 2, (im.height - side) // 2
                    im = im.crop((left, top, left + side, top + side)).resize((w, h), Image.BICUBIC)
                rows.append(np.asarray(im, dtype=np.uint8).reshape(h, w, c))
        images = np.stack(rows)
    else:
        raise FileNotFoundError(f"--data {path}: neither a folder of images nor an .npz file")
    if images.shape[1:] != (h, w, c):
        raise ValueError(f"{path}: images are {images.shape[1:]} (HWC), the model wants {(h, w, c)}")
    return from_uint8(images), labels


def model_pool(net, n: int, nfe: int, batch: int, seed: int = 0, progress: bool = True, cond: dict | None = None):
    """n samples of the model itself (dpmpp_2m, logSNR grid, final denoising) and their labels.

    A class-conditional model samples uniform labels, unguided; cond (n rows): sample i is drawn
    with row i of each input, unguided. Sample i uses noise seed ``seed + i``
    (``genie_fast.sampling.seed_noise``). A pixel model's samples are clamped to [-1, 1]."""
    from ..guidance import Conditioned
    from ..sampling import sample, seed_noise

    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(net.num_classes, (n,), generator=gen) if net.num_classes and cond is None else None
    out = []
    for i in tqdm(range(0, n, batch), desc="data-free pool", disable=not progress, dynamic_ncols=True):
        b = min(batch, n - i)
        noise = seed_noise(range(seed + i, seed + i + b), net.image_shape)
        model = Conditioned(net, labels[i:i + b]) if labels is not None else net
        rows = None if cond is None else {k: v[i:i + b] for k, v in cond.items()}
        x0, _ = sample(model, noise=noise, solver="dpmpp_2m", nfe=nfe, grid="logsnr", denoise=True, cond=rows,
                       guidance_scale=None if rows is None else 1.0)
        out.append(x0.clamp(-1, 1) if getattr(net, "space", "pixel") == "pixel" else x0)
    return torch.cat(out), labels


def _cond_rows(args, net, n: int):
    """(cond, negative) of --cond / --negative-cond with n rows each, or (None, None); checked by name."""
    from ..conditioning import check_cond, check_cond_names, read_cond_file

    if args.negative_cond and not args.cond:
        raise ValueError("--negative-cond needs --cond")
    if not args.cond:
        if getattr(net, "conditional", False):
            raise ValueError(f"--diffusers {args.diffusers}: a UNet2DConditionModel needs its conditioning: "
                             f"--cond FILE.npz with {list(net.cond_names)[:1]} (one row per sample, or one row)")
        return None, None
    cond = check_cond(read_cond_file(args.cond, "--cond"), n, "--cond")
    check_cond_names(net, cond, "--cond")
    if "encoder_hidden_states" not in cond and getattr(net, "conditional", False):
        raise ValueError(f"--cond {args.cond}: a UNet2DConditionModel needs 'encoder_hidden_states'")
    if not args.negative_cond:
        return cond, None
    neg = check_cond(read_cond_file(args.negative_cond, "--negative-cond"), n, "--negative-cond")
    for k, v in neg.items():
        if k not in cond or v.shape != cond[k].shape:
            raise ValueError(f"--negative-cond {args.negative_cond}: {k!r} {tuple(v.shape)} has no counterpart of "
                             f"that shape in --cond")
    return cond, neg


def distill_diffusers(args) -> Path:
    """The ``distill --diffusers DIR`` run; returns the stem of the head written beside the model."""
    check_int("--pool", args.pool, 1)
    check_int("--pool-nfe", args.pool_nfe, 2)
    check_distill_args(args, default_target=DIFFUSERS_TARGET)
    require("diffusers", "genie-fast distill --diffusers")
    model_dir = Path(args.diffusers)
    head_stem = _head_stem(args.head_out or model_dir)
    if Path(f"{head_stem}.safetensors").exists() and not (args.resume or args.overwrite):
        raise ValueError(f"{head_stem}.safetensors exists and this run would replace it at the end; pass "
                         f"--overwrite (or --head-out elsewhere)")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    ckpt_path = out / "ckpt.pt"
    net = load_diffusers(model_dir, head=None)
    for p in net.parameters():
        p.requires_grad_(False)
    unet_sha = weights_hash(net.unet)
    schedule = net.schedule
    if args.target == "secant":  # the span must fit in [t_end, 1] of this schedule
        check_span_t(args.span_t, schedule, "--span-t")
    out.mkdir(parents=True, exist_ok=True)

    state = load_checkpoint(ckpt_path, DISTILL_KEYS) if (args.resume and ckpt_path.exists()) else None
    check_resumed_target(state, args, ckpt_path)
    if state is not None and state.get("unet_sha256") != unet_sha:
        raise ValueError(f"{ckpt_path} was distilled for other UNet weights than {model_dir}'s; "
                         f"use another --out or --overwrite")
    if state is not None:
        head_cfg = HeadConfig.from_dict(state["head_config"])
    elif args.init_head:
        init = load_head(args.init_head, net, check_unet=False)
        head_cfg = init.config
    else:
        head_cfg = HeadConfig.for_unet(net, width=args.width, num_res_blocks=args.head_blocks)
    torch.manual_seed(args.seed)
    model = DiffusersGenieModel(net, GenieHead(head_cfg), schedule)
    if state is None and args.init_head:
        model.head.load_state_dict(init.state_dict())
    ema_head, opt, step, wall = head_state(model, state, ckpt_path, args.lr)

    cond, negative = _cond_rows(args, net, args.pool) if not args.data else (None, None)
    if args.data:
        x_train, y_train = load_images(args.data, net.image_shape)
        data_desc = str(args.data)
        cond, negative = _cond_rows(args, net, len(x_train))
    else:
        pool_path = out / "pool.pt"
        if pool_path.exists():
            try:  # tensors only (weights_only): a crafted file cannot run code
                pool = torch.load(pool_path, map_location="cpu", weights_only=True)
                x_train, y_train = pool["x0"], pool["labels"]
            except Exception as e:
                raise ValueError(f"{pool_path} cannot be read as a sample pool ({type(e).__name__}); "
                                 f"remove it to draw the pool again") from None
        else:
            x_train, y_train = model_pool(net, args.pool, args.pool_nfe, args.batch, seed=args.seed, cond=cond)
            torch.save({"x0": x_train, "labels": y_train}, f"{pool_path}.tmp")
            Path(f"{pool_path}.tmp").replace(pool_path)
        data_desc = f"data-free: {len(x_train)} dpmpp_2m samples at NFE {args.pool_nfe}"
    num_classes = net.num_classes
    if num_classes and y_train is None:  # unlabelled images: distil along random labels
        y_train = torch.randint(num_classes, (len(x_train),), generator=torch.Generator().manual_seed(args.seed))
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step + 7)
    if cond is not None and len(x_train) != next(iter(cond.values())).shape[0]:
        raise ValueError(f"{out / 'pool.pt'} holds {len(x_train)} samples, --cond gives rows for "
                         f"{next(iter(cond.values())).shape[0]}: remove it, or give --pool {len(x_train)}")
    rows = torch.arange(len(x_train)) if cond is not None else y_train if num_classes else None
    batches = infinite_batches(x_train, args.batch, gen, hflip=False, labels=rows)
    meta = {"diffusers": str(model_dir), "unet_sha256": unet_sha, "data": data_desc,
            "head_config": head_cfg.to_dict(), "head_params": count_parameters(model.head),
            "unet_params": count_parameters(net.unet), "args": jsonable_args(args)}
    log = open_run_log(out, meta, f"# start step={step} {json.dumps(meta)}")

    def checkpoint(step, wall):
        save_checkpoint(ckpt_path, {"head_config": head_cfg.to_dict(), "head": model.head.state_dict(),
                                    "ema_head": ema_head.state_dict(), "opt": opt.state_dict(), "step": step,
                                    "wall_s": wall, "unet_sha256": unet_sha, "diffusers": str(model_dir),
                                    "target": args.target, "span_t": args.span_t})

    step, wall = train_head(args, model, ema_head, opt, step, wall, batches, gen, num_classes, checkpoint, ckpt_path,
                            log, "distill (diffusers)", cond=cond, negative=negative)
    stem = save_head(ema_head, args.head_out or model_dir, unet_sha256=unet_sha,
                     provenance={"distill_steps": step, "batch": args.batch, "lr": args.lr, "data": data_desc,
                                 "target": args.target, "span_t": args.span_t, "wall_s": round(wall, 1)})
    log.write(f"# done step={step} wall_s={wall:.0f} head={stem}\n")
    log.close()
    return stem
