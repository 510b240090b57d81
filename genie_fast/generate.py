"""``genie-fast generate``: one image per seed, for many seeds, sharded over torchrun ranks, resumable.

    genie-fast generate --seeds 0-49999 --outdir out/fid --batch 64 --solver genie --nfe 10
    torchrun --nproc_per_node 8 -m genie_fast.cli generate --seeds 0-49999 --outdir out/fid ...
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m genie_fast.cli generate ...          (several machines: --outdir on a shared file system)

* Seeds. The image of seed s starts from x_T = randn(C, H, W) drawn on the CPU (float32) from its
  own ``torch.Generator().manual_seed(s)`` (``genie_fast.noise.seed_noise``, the same noise as
  ``genie_fast.sample(seeds=[s])``).
* Batches. The seeds still to do, in the order given, are cut into consecutive chunks of
  ``--batch``; chunk i runs on rank i % world_size. A seed's image depends on its chunk, not on
  which rank ran it, so it is bitwise the same whatever the world size at a fixed ``--batch`` (and
  thread count); across batch sizes it stays within one 8-bit level.
* Files in ``--outdir`` (`genie_fast.store`): ``manifest.json`` (what was sampled, and versions),
  ``batches/<first seed>_<count>.npz`` or ``images/<seed>.png``, each written atomically, so a
  kill -9 loses only the batches in flight; at the end ``samples.npz`` holds all samples of the
  folder in ascending seed order in the layout FID tools read (``arr_0`` uint8 NHWC RGB, ``arr_1``
  the labels of a class-conditional run, ``seeds``); the manifest then records counts and NFE spent.
* Labels (``--labels``, `cli_args.LABELS_HELP`): one class for every seed, or a list of classes of
  which seed s gets number s mod its length ("all" / "cycle": class s mod the number of classes).
* Conditioning (``--cond FILE.npz``, ``--negative-cond FILE.npz``; `genie_fast.conditioning`): one
  array per input name (e.g. ``encoder_hidden_states``) with one row per seed, in the order of
  ``--seeds`` (or in the order of the file's own ``seeds`` array), or one row for every seed. The
  manifest records the files' content hashes: a rerun with other conditioning is refused. A latent
  model with a decoder (a pipeline folder with ``vae/``) writes the decoded images.
* Resuming. A rerun skips the seeds already written (with any world size); a rerun into a folder
  whose manifest describes other sampling (model, solver, NFE, grid, ...) is refused.
* Failures. After each round of batches (one per rank) the ranks exchange a failure flag
  (`ProcessGroup.failed`): a rank that raised makes every rank stop within one batch's time, itself
  with its own error, the others with `RankFailed` (one line); the written batches stay.

Processes start from torchrun's environment (`genie_fast.distributed`: gloo on CPUs, NCCL on GPUs,
device ``cuda:LOCAL_RANK``); rank 0 checks the folder and shows the progress of all ranks.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import torch

from .cli_args import add_sampling_args, check_sampling_args
from .devices import command_device
from .distributed import ProcessGroup, RankFailed
from .files import to_uint8, weights_hash  # also names of this module (generate.to_uint8, generate.weights_hash)
from .noise import check_seed, check_seeds, seed_noise  # the one home of seeds (also sample(seeds=))
from .store import Folder, finish, format_seeds, open_run  # format_seeds: also a name of this module

__all__ = ["parse_seeds", "format_seeds", "seed_noise", "weights_hash", "to_uint8", "generate",
           "build_parser", "check_args", "main"]

MAX_SEEDS = 10_000_000  # 200 FID sets of 50k; a larger range is more likely a typo than a plan


# --------------------------------------------------------------------------- small pieces

def parse_seeds(spec: str) -> list[int]:
    """"0-49999", "3", "0-9,20-29" -> the seeds in that order (ranges inclusive, no repeats)."""
    seeds = []
    for part in str(spec).replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"--seeds {spec!r}: {part!r} is not a seed or a range a-b (e.g. 0-49999,60000)")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise ValueError(f"--seeds {spec!r}: range {part} is empty")
        if len(seeds) + b + 1 - a > MAX_SEEDS:  # checked before the list is built: no hang, no OOM
            raise ValueError(f"--seeds {spec!r}: more than {MAX_SEEDS:,} seeds in one run")
        check_seed(f"--seeds {spec!r}: seed", b)  # (a <= b: the whole range is in [0, 2**32))
        seeds.extend(range(a, b + 1))
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {spec!r}: a seed appears twice")
    return seeds


# --------------------------------------------------------------------------- generation

def _label_spec(labels):
    """generate's labels (None, a class, a list of classes, "all" / "cycle") as the manifest records
    them: None, an int, a list of two or more ints, or "cycle" (the spelling of earlier manifests)."""
    if labels is None or isinstance(labels, int):
        return labels
    if isinstance(labels, str):
        if labels in ("all", "cycle"):
            return "cycle"
        raise ValueError(f"labels must be a class, a list of classes, 'all' or 'cycle', got {labels!r}")
    labels = [int(c) for c in labels]
    if not labels:
        raise ValueError("labels: an empty list of classes")
    return labels[0] if len(labels) == 1 else labels


def _labels_for(seeds, spec, num_classes: int):
    """Per-seed labels of a `_label_spec`: seed s gets class s mod K ("cycle") or the list's class
    number s mod its length (a single class: every seed)."""
    if spec is None:
        return None
    if num_classes <= 0:
        raise ValueError("--labels was given but the model is not class-conditional")
    classes = list(range(num_classes)) if spec == "cycle" else [spec] if isinstance(spec, int) else spec
    return torch.tensor([classes[s % len(classes)] for s in seeds], dtype=torch.long)


def _cond_source(cond, seeds, flag: str):
    """(per-seed rows {name: (len(seeds), ...)}, content hash) of a --cond file or mapping, or (None, None)."""
    import hashlib

    from .conditioning import check_cond, read_cond_file

    if cond is None:
        return None, None
    arrays = read_cond_file(cond, flag) if not hasattr(cond, "items") else dict(cond)
    order = arrays.pop("seeds", None)
    if order is not None:  # rows named by seed
        position = {int(s): i for i, s in enumerate(order.tolist())}
        missing = [s for s in seeds if s not in position]
        if missing:
            raise ValueError(f"{flag}: its seeds array has no row for seed(s) {missing[:5]}")
        index = torch.tensor([position[s] for s in seeds])
        arrays = {k: torch.as_tensor(v)[index] if torch.as_tensor(v).shape[0] == len(order) else v
                  for k, v in arrays.items()}
    rows = check_cond(arrays, len(seeds), flag)
    digest = hashlib.sha256()
    for k in sorted(rows):
        digest.update(k.encode() + str(rows[k].dtype).encode() + str(tuple(rows[k].shape)).encode())
        digest.update(rows[k].cpu().contiguous().numpy().tobytes())
    return rows, digest.hexdigest()


def generate(model, seeds, outdir, *, model_info: dict | None = None, batch: int = 64, solver=None, nfe=None,
             steps=None, grid=None, afs=None, denoise: bool = False, labels=None, guidance_scale=None,
             fmt: str = "npz", device=None, net_dtype=None, backend: str = "auto", progress: bool = True,
             compile: bool = False, cond=None, negative_cond=None) -> dict:
    """Sample one image per seed into ``outdir`` (see the module docstring); returns the manifest.

    model: an eps model (``.schedule``, ``.image_shape``); labels: None, a class, a list of classes
    (seed s gets number s mod its length) or "all" / "cycle" (class s mod the number of classes);
    guidance_scale: classifier-free guidance scale (diffusers convention) with labels; device:
    `devices.command_device` (default CUDA when available). Call it on every rank of a torchrun
    job (or alone). compile: the network compiled by torch.compile (the CPU only; its compile time is
    printed once, on stderr). cond / negative_cond: conditioning inputs, an .npz file or a mapping of
    arrays, one row per seed (module docstring); guidance_scale None then means the default scale
    where a negative branch exists (`guidance.conditioned`)."""
    from .checks import check_int, check_number
    from .guidance import DEFAULT_GUIDANCE_SCALE, Conditioned, check_labels, conditioned
    from .engine import engine_for
    from .grid_store import tuned_for
    from .sampling import sample
    from .solvers import resolve

    if fmt not in ("npz", "png"):
        raise ValueError(f"--format must be npz or png, got {fmt!r}")
    check_int("--batch", batch, 1)
    seeds = check_seeds("seeds", seeds, unique=True)
    if guidance_scale is not None:
        check_number("--guidance-scale", guidance_scale)
    if guidance_scale is not None and labels is None and cond is None:
        raise ValueError("--guidance-scale needs --labels or --cond (guidance mixes conditional and unconditional "
                         "predictions)")
    if negative_cond is not None and cond is None:
        raise ValueError("--negative-cond needs --cond")
    if labels is not None and cond is not None:
        raise ValueError("give --labels or --cond, not both (class labels can be a 'labels' array of --cond)")
    if cond is None and "encoder_hidden_states" in (getattr(model, "cond_names", None) or ()):
        raise ValueError("the model is a text-conditioned UNet (UNet2DConditionModel): give its conditioning, "
                         "--cond FILE.npz with encoder_hidden_states (one row per seed, or one row)")
    cond_rows, cond_hash = _cond_source(cond, seeds, "--cond")
    neg_rows, neg_hash = _cond_source(negative_cond, seeds, "--negative-cond")
    if nfe is not None and steps is not None:
        raise ValueError("give --nfe or --steps, not both")
    # the options as sample() will run them, defaults and per-solver choices filled in (for the manifest)
    opts = resolve(solver, nfe, steps, "auto" if grid == "tuned" else grid, afs, denoise)
    image_shape = tuple(int(d) for d in model.image_shape)
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    labels = _label_spec(labels)
    if labels is not None:
        if labels == "cycle":
            if num_classes <= 0:
                raise ValueError("--labels was given but the model is not class-conditional")
        else:  # refuses an unconditional model or a bad class by name
            check_labels(labels, 1, num_classes) if isinstance(labels, int) else check_labels(labels, len(labels), num_classes)
        if guidance_scale is None:  # as genie_fast.guidance.conditioned: labels alone mean the default scale
            guidance_scale = DEFAULT_GUIDANCE_SCALE
    if cond_rows is not None:  # checked against the model, by name, before any work; the scale resolved
        first = {k: v[:1] for k, v in cond_rows.items()}
        guidance_scale = conditioned(model, None, guidance_scale, 1, cond=first,
                                     negative_cond=None if neg_rows is None else {k: v[:1] for k, v in
                                                                                 neg_rows.items()}).scale.item()
    # grid auto / tuned: a grid tuned for the model (`grid_store`) is fixed here, so the manifest names its times
    tuned = tuned_for(model, solver, nfe, steps, grid, afs, denoise,
                      guidance_scale if labels is not None or cond_rows is not None else None)
    if tuned is not None:
        opts = opts._replace(grid=tuned, steps=len(tuned) - 1, afs=tuned.afs)
    device = command_device(device)
    if compile and device.type != "cpu":
        raise ValueError(f"--compile is for the CPU (on {device} the engine replays CUDA graphs)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    info = dict(model_info or {})
    info.setdefault("sha256", weights_hash(model) if isinstance(model, torch.nn.Module) else None)
    grid = opts.grid if isinstance(opts.grid, str) else [float(t) for t in opts.grid]
    identity = {"model_sha256": info["sha256"], "solver": opts.solver, "nfe": opts.nfe, "steps": steps,
                "grid": grid, "afs": opts.afs, "denoise": opts.denoise, "labels": labels,
                "guidance_scale": guidance_scale, "image_shape": list(image_shape), "format": fmt,
                "net_dtype": None if net_dtype is None else str(net_dtype).replace("torch.", "")}
    if cond_hash is not None:  # (absent otherwise: manifests of unconditioned runs stay as they were)
        identity.update(cond_sha256=cond_hash, negative_cond_sha256=neg_hash)
    decode = getattr(model, "decode", None) if getattr(model, "space", "pixel") == "latent" else None

    outdir = Path(outdir)
    folder = Folder(outdir, fmt)
    dist = ProcessGroup(device)
    try:
        manifest_path = outdir / "manifest.json"
        plan = None
        if dist.rank == 0:
            try:
                plan = open_run(outdir, folder, manifest_path, identity, info, seeds, batch)
            except Exception as e:  # every rank must hear of it, not wait forever
                plan = f"{outdir}: {type(e).__name__}: {e}"
        plan = dist.broadcast(plan)
        if isinstance(plan, str):  # printed by rank 0 only
            raise ValueError(plan) if dist.rank == 0 else RankFailed(f"rank 0 refused {outdir} (its error is "
                                                                      "printed by rank 0)")
        chunks = plan["chunks"]

        error = None
        try:
            if isinstance(model, torch.nn.Module):
                model = model.to(device)
        except Exception as e:  # told to the other ranks in the first round below
            error = e
        bar = None
        if dist.rank == 0 and progress:
            from tqdm import tqdm

            bar = tqdm(total=len(seeds), initial=len(seeds) - sum(map(len, chunks)), unit="img",
                       desc=f"generate ({dist.world} rank{'s' if dist.world > 1 else ''})", dynamic_ncols=True)
            names_at_start = set(folder.names())
            done_at_start = bar.n

            def refresh():
                bar.n = done_at_start + folder.count([n for n in folder.names() if n not in names_at_start])
                bar.refresh()
        else:
            def refresh():
                pass

        wrapper, nfe_spent, tag, engines = None, None, f"{dist.rank}-{os.getpid()}", {}
        position = {s: i for i, s in enumerate(seeds)}
        budget = {"nfe": opts.nfe} if steps is None else {"steps": steps}
        mine = chunks[dist.rank::dist.world]
        # One round per chunk index, on every rank (a rank with fewer chunks still takes part): after
        # each, the ranks learn whether one of them failed, so a rank that raised never leaves the
        # others waiting in a collective; all then stop within one batch's time.
        for i in range(-(-len(chunks) // dist.world)):
            if error is None and i < len(mine):
                chunk = mine[i]
                try:
                    noise = seed_noise(chunk, image_shape).to(device)
                    chunk_labels = _labels_for(chunk, labels, num_classes)
                    eps_model = model
                    if chunk_labels is not None:
                        lab = check_labels(chunk_labels, len(chunk), num_classes, device)
                        if wrapper is None or wrapper.labels.shape != lab.shape:
                            wrapper = Conditioned(model, lab, guidance_scale)
                        else:
                            wrapper.update(lab, guidance_scale)
                        eps_model = wrapper
                    kw = dict(noise=noise, solver=opts.solver, grid=opts.grid, afs=opts.afs, denoise=opts.denoise,
                              net_dtype=net_dtype, **budget)
                    if cond_rows is not None:  # this chunk's rows, in its seeds' order
                        at = torch.tensor([position[s] for s in chunk])
                        kw.update(cond={k: v[at].to(device) for k, v in cond_rows.items()},
                                  guidance_scale=guidance_scale)
                        if neg_rows is not None:
                            kw["negative_cond"] = {k: v[at].to(device) for k, v in neg_rows.items()}
                    if compile:  # one engine per model keeps its compiled network for the whole run
                        engine = engines[id(eps_model)] = engine_for(eps_model, device, backend, compile=True)
                        x0, nfe_spent = engine.sample(**kw)
                    else:
                        x0, nfe_spent = sample(eps_model, device=device, backend=backend, **kw)
                    if decode is not None:  # a latent model's images
                        with torch.no_grad():
                            x0 = decode(x0)
                    folder.write(chunk, to_uint8(x0), chunk_labels, tag)
                except Exception as e:  # told to the other ranks below, then raised here
                    error = e
                refresh()
            if _stop(dist, error, refresh if bar is not None else None):
                break
        try:
            _stop(dist, error, refresh if bar is not None else None, final=True)
        finally:
            if bar is not None:
                refresh()
                bar.close()

        if engines and dist.rank == 0:
            infos = [e.cache_info() for e in engines.values()]
            print(f"genie-fast generate: compiled the network in {sum(i['compile_s'] for i in infos):.1f} s "
                  f"({sum(i['compiles'] for i in infos)} compile(s), once per batch shape)", file=sys.stderr)
        result = None
        if dist.rank == 0:
            try:
                result = finish(outdir, folder, manifest_path, plan["manifest"], nfe_spent, dist.world, labels)
            except Exception as e:
                error = e
        _stop(dist, error, None, final=True)
        return dist.broadcast(result)
    finally:
        dist.close()


def _stop(dist: ProcessGroup, error, while_waiting=None, final: bool = False) -> bool:
    """Whether any rank failed (`ProcessGroup.failed`, called by every rank at the same point). With
    final=True a failure is raised: this rank's own error, else `RankFailed` naming the first rank
    that failed (whose error that rank prints); the files written so far stay, for a rerun."""
    first = dist.failed(error is not None, while_waiting)
    if first is None or not final:
        return first is not None
    if error is not None:
        raise error
    raise RankFailed(f"rank {first} of {dist.world} failed (its error is printed by that rank); this rank "
                     "stopped. The batches written so far are kept: rerun the same command to resume")


# --------------------------------------------------------------------------- command line

def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="genie-fast generate", description=__doc__.splitlines()[0])
    p.add_argument("--outdir", required=True, help="output folder (resumable; see genie_fast.generate)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="genie_fast model stem (default: the bundled model)")
    src.add_argument("--diffusers", default=None, metavar="DIR",
                     help="a diffusers UNet2DModel or UNet2DConditionModel folder (its genie_head.* is loaded "
                          "when present; a pipeline's vae/ decodes latents)")
    p.add_argument("--batch", type=int, default=64, help="images per network call and per file")
    add_sampling_args(p, seed="seeds", model=False)
    p.add_argument("--cond", default=None, metavar="FILE.npz",
                   help="conditioning inputs (e.g. encoder_hidden_states of a UNet2DConditionModel): one array per "
                        "name, one row per seed in --seeds order (or a 'seeds' array naming the rows), or one row")
    p.add_argument("--negative-cond", default=None, metavar="FILE.npz",
                   help="the negative branch of guidance (e.g. the empty prompt's embeddings), as --cond")
    p.add_argument("--format", default="npz", choices=("npz", "png"), help="per-batch files (default npz)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="compile the network with torch.compile (CPU; pays off over many batches: its compile "
                        "time is printed)")
    return p

def load_for_generate(model_stem=None, diffusers_dir=None):
    """(model, model_info) for the command line."""
    if diffusers_dir:
        from .models.diffusers import load_diffusers

        model = load_diffusers(diffusers_dir)
        return model, {"kind": "diffusers", "source": str(diffusers_dir),
                       "head": model.head is not None if hasattr(model, "head") else False}
    from .models.default import default_model_path, load_default, load_model

    if model_stem:
        return load_model(model_stem), {"kind": "genie_fast", "source": str(model_stem)}
    return load_default(), {"kind": "genie_fast", "source": str(default_model_path())}


def check_args(args):
    """Refuse bad arguments and an unusable --outdir before a model is loaded (one line each);
    returns (seeds, labels)."""
    from .checks import check_out_dir, require

    check_out_dir(args.outdir, "--outdir")
    labels = check_sampling_args(args)
    if args.format == "png":
        require("PIL.Image", "genie-fast generate --format png")
    if args.diffusers:
        require("diffusers", "genie-fast generate --diffusers")
    seeds = parse_seeds(args.seeds)
    if args.negative_cond and not args.cond:
        raise ValueError("--negative-cond needs --cond")
    if labels is not None and args.cond:
        raise ValueError("give --labels or --cond, not both (class labels can be a 'labels' array of --cond)")
    from .conditioning import read_cond_file
    for flag, path in (("--cond", args.cond), ("--negative-cond", args.negative_cond)):
        if path is not None:
            read_cond_file(path, flag)  # a file that cannot be read is refused before the model is loaded
    return seeds, labels


def run(args) -> dict:
    seeds, labels = check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, info = load_for_generate(args.model, args.diffusers)
    manifest = generate(model.eval(), seeds, args.outdir, model_info=info, batch=args.batch,
                        solver=args.solver, nfe=args.nfe, steps=args.steps, grid=args.grid, afs=args.afs,
                        denoise=args.denoise, labels=labels, guidance_scale=args.guidance_scale, fmt=args.format,
                        device=args.device, net_dtype=args.net_dtype, backend=args.backend,
                        progress=not args.no_progress, compile=args.compile, cond=args.cond,
                        negative_cond=args.negative_cond)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {Path(args.outdir) / 'samples.npz'} ({manifest['count']} samples, "
              f"{manifest['identity']['solver']}, {manifest['nfe_per_sample']} NFE each)")
    return manifest


def main(argv=None):
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
