"""``genie-fast generate``: one image per seed, for many seeds, sharded over torchrun ranks, resumable.

    genie-fast generate --seeds 0-49999 --outdir out/fid --batch 64 --solver genie --nfe 10
    torchrun --nproc_per_node 8 -m genie_fast.cli generate --seeds 0-49999 --outdir out/fid ...
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m genie_fast.cli generate ...          (several machines: --outdir on a shared file system)

* Seeds. The image of seed s starts from x_T = randn(C, H, W) drawn on the CPU (float32) from its
  own ``torch.Generator().manual_seed(s)`` (``genie_fast.engine.seed_noise``, the same noise as
  ``genie_fast.sample(seeds=[s])``).
* Batches. The seeds still to do, in the order given, are cut into consecutive chunks of
  ``--batch``; chunk i runs on rank i % world_size. A seed's image depends on its chunk, not on
  which rank ran it, so it is bitwise the same whatever the world size at a fixed ``--batch`` (and
  thread count); across batch sizes it stays within one 8-bit level.
* Files in ``--outdir``: ``manifest.json`` (what was sampled: model sha256, solver, NFE or steps,
  grid, AFS, denoising, labels, guidance scale, image shape, format; and versions),
  ``batches/<first seed>_<count>.npz`` (``--format npz``: seeds, uint8 NHWC images, labels) or
  ``images/<seed>.png`` (``--format png``), each written to a temporary name and renamed when
  complete, so a kill -9 loses only the batches in flight. At the end, ``samples.npz`` holds all
  samples of the folder in ascending seed order in the layout FID tools read: ``arr_0`` uint8
  NHWC (grayscale repeated to RGB, as Inception wants 3 channels), ``arr_1`` the labels of a
  class-conditional run, ``seeds``; the manifest then records counts and NFE spent.
* Resuming. A rerun skips the seeds already written (with any world size); a rerun into a folder
  whose manifest describes other sampling (model, solver, NFE, grid, ...) is refused.

Processes start from torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) with gloo
on CPUs and NCCL on GPUs (device ``cuda:LOCAL_RANK``); rank 0 checks the folder and shows the
progress of all ranks.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from .engine import seed_noise  # the one definition of a per-image seed's noise (also sample(seeds=))
from .files import to_uint8, weights_hash  # also names of this module (generate.to_uint8, generate.weights_hash)

__all__ = ["parse_seeds", "format_seeds", "seed_noise", "weights_hash", "to_uint8", "generate",
           "build_parser", "check_args", "main"]

FORMAT = "genie_fast.generate"
VERSION = 1
IDENTITY_KEYS = ("model_sha256", "solver", "nfe", "steps", "grid", "afs", "denoise", "labels", "guidance_scale",
                 "image_shape", "format")
MAX_SEEDS = 10_000_000  # 200 FID sets of 50k; a larger range is more likely a typo than a plan
_BATCH_FILE = re.compile(r"^(\d+)_(\d+)\.npz$")
_PNG_FILE = re.compile(r"^(\d+)\.png$")


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
        seeds.extend(range(a, b + 1))
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {spec!r}: a seed appears twice")
    if max(seeds) >= 2 ** 32:  # torch's CPU generator keeps 32 bits of a seed: 2**32 would repeat seed 0
        raise ValueError(f"--seeds {spec!r}: seeds must be below 2**32 (= {2 ** 32})")
    return seeds


def format_seeds(seeds) -> str:
    """Sorted seeds as compact ranges: [0, 1, 2, 5] -> "0-2,5"."""
    seeds = sorted(seeds)
    parts, i = [], 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(str(seeds[i]) if i == j else f"{seeds[i]}-{seeds[j]}")
        i = j + 1
    return ",".join(parts)


def _atomic_bytes(path: Path, data: bytes, tag: str):
    tmp = path.with_name(f"{path.name}.tmp-{tag}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def _versions() -> dict:
    import genie_fast

    v = {"genie_fast": genie_fast.__version__, "torch": torch.__version__, "numpy": np.__version__,
         "python": platform.python_version()}
    from importlib import metadata

    try:  # the installed version, without importing diffusers for it
        v["diffusers"] = metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        pass
    return v


# --------------------------------------------------------------------------- the output folder

class _Folder:
    """What is on disk: the batch files / PNGs and the seeds they hold."""

    def __init__(self, outdir: Path, fmt: str):
        self.outdir, self.fmt = outdir, fmt
        self.data = outdir / ("batches" if fmt == "npz" else "images")

    def names(self) -> list[str]:
        if not self.data.is_dir():
            return []
        pattern = _BATCH_FILE if self.fmt == "npz" else _PNG_FILE
        return [n for n in os.listdir(self.data) if pattern.match(n)]

    def count(self, names) -> int:
        if self.fmt == "png":
            return len(names)
        return sum(int(_BATCH_FILE.match(n).group(2)) for n in names)

    def done_seeds(self) -> set[int]:
        if self.fmt == "png":
            return {int(_PNG_FILE.match(n).group(1)) for n in self.names()}
        done = set()
        for n in self.names():
            try:  # batch files are written atomically: an unreadable one was damaged after the fact
                with np.load(self.data / n) as f:
                    done.update(int(s) for s in f["seeds"])
            except Exception as e:
                raise ValueError(f"{self.data / n} cannot be read ({type(e).__name__}: {e}); remove it and "
                                 f"rerun to sample its seeds again") from None
        return done

    def remove_stale_tmp(self):
        for d in (self.outdir, self.data):
            if d.is_dir():
                for n in os.listdir(d):
                    if ".tmp-" in n:
                        (d / n).unlink(missing_ok=True)

    def write(self, seeds, images, labels, tag: str):
        self.data.mkdir(parents=True, exist_ok=True)
        if self.fmt == "npz":
            arrays = {"seeds": np.asarray(seeds, dtype=np.int64), "images": images}
            if labels is not None:
                arrays["labels"] = labels.numpy().astype(np.int64)
            _atomic_bytes(self.data / f"{seeds[0]}_{len(seeds)}.npz", _npz_bytes(**arrays), tag)
        else:
            for s, image in zip(seeds, images):
                _atomic_bytes(self.data / f"{s}.png", _png_bytes(image), tag)

    def records(self):
        """Yields (seeds, images uint8 NHWC, labels or None) per file."""
        if self.fmt == "npz":
            for n in sorted(self.names()):
                with np.load(self.data / n) as f:
                    yield f["seeds"], f["images"], (f["labels"] if "labels" in f else None)
        else:
            from PIL import Image

            for n in sorted(self.names()):
                with Image.open(self.data / n) as im:
                    a = np.asarray(im, dtype=np.uint8)
                yield np.array([int(_PNG_FILE.match(n).group(1))]), (a[None, ..., None] if a.ndim == 2 else a[None]), None


def _write_samples_npz(folder: _Folder, path: Path, labels_by_seed: dict | None) -> int:
    """All samples of the folder in ascending seed order -> path (arr_0 uint8 NHWC RGB, arr_1, seeds).

    Rows are gathered in a memory-mapped .npy first, so 50k large images never sit in memory."""
    index = []  # (seed, record number, row)
    for k, (seeds, _, _) in enumerate(folder.records()):
        index.extend((int(s), k, r) for r, s in enumerate(seeds))
    index.sort()
    position = {(k, r): i for i, (_, k, r) in enumerate(index)}
    seeds_sorted = np.array([s for s, _, _ in index], dtype=np.int64)
    labels = np.zeros(len(index), dtype=np.int64)
    have_labels = False
    rgb = None
    for k, (seeds, images, lab) in enumerate(folder.records()):
        if rgb is None:
            n, (h, w, c) = len(index), images.shape[1:]
            tmp_npy = path.with_name(f".{path.name}.arr_0.npy.tmp-0")
            rgb = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.uint8, shape=(n, h, w, 3))
        for r in range(len(seeds)):
            i = position[(k, r)]
            rgb[i] = images[r] if images.shape[-1] == 3 else np.repeat(images[r], 3, axis=-1)
            if lab is not None:
                labels[i], have_labels = lab[r], True
    if rgb is None:
        raise ValueError(f"{folder.outdir}: no samples to collect")
    rgb.flush()
    del rgb
    tmp_zip = path.with_name(f"{path.name}.tmp-0")
    with zipfile.ZipFile(tmp_zip, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with open(tmp_npy, "rb") as src, zf.open("arr_0.npy", "w", force_zip64=True) as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
        extra = {"seeds": seeds_sorted}
        if have_labels:
            extra["arr_1"] = labels
        for key, arr in extra.items():
            buf = io.BytesIO()
            np.save(buf, arr)
            zf.writestr(f"{key}.npy", buf.getvalue())
    os.replace(tmp_zip, path)
    os.unlink(tmp_npy)
    return len(index)


# --------------------------------------------------------------------------- torch.distributed

class _Dist:
    """Rank, world size and collectives; a single process when not started by torchrun."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, self.pg = 0, None
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.pg, self.rank, self.world = dist, dist.get_rank(), dist.get_world_size()

    def broadcast(self, obj):
        if self.pg is None:
            return obj
        box = [obj]
        self.pg.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self, while_waiting=None):
        """Wait for every rank; rank 0 calls while_waiting() about twice a second meanwhile."""
        if self.pg is None:
            return
        if while_waiting is None:
            self.pg.barrier()
            return
        work = self.pg.barrier(async_op=True)
        while while_waiting is not None and not work.is_completed():
            while_waiting()
            time.sleep(0.5)
        work.wait()

    def close(self):
        if self.pg is not None and self.pg.is_initialized():
            # every rank done talking before any tears its connections down (a gloo rank destroyed
            # while its peer still sends can abort in a background thread)
            self.pg.barrier()
            self.pg.destroy_process_group()


def _device(spec: str | None) -> torch.device:
    from .checks import check_device

    if spec in (None, "auto"):
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = check_device(spec, "--device")
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


# --------------------------------------------------------------------------- generation

def _labels_for(seeds, spec, num_classes: int):
    """Per-seed labels: None, one class for all, or "cycle" (seed mod num_classes)."""
    if spec is None:
        return None
    if num_classes <= 0:
        raise ValueError("--labels was given but the model is not class-conditional")
    if spec == "cycle":
        return torch.tensor([s % num_classes for s in seeds], dtype=torch.long)
    return torch.full((len(seeds),), int(spec), dtype=torch.long)


def _resolve(solver, nfe, steps, grid, afs):
    """The sampling options as sample() will run them: its defaults, and the per-solver choices
    behind grid="auto" / afs=None, filled in (so the manifest says what was run)."""
    import inspect

    from . import solvers
    from .sampling import sample

    defaults = inspect.signature(sample).parameters
    solver = solver or defaults["solver"].default
    if solver not in solvers.SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(solvers.SOLVERS)}")
    if nfe is not None and steps is not None:
        raise ValueError("give --nfe or --steps, not both")
    if nfe is None and steps is None:
        nfe = getattr(solvers, "DEFAULT_NFE", 10)
    grid = defaults["grid"].default if grid is None else grid
    if grid == "auto":
        grid = getattr(solvers, "AUTO_GRID", {}).get(solver, grid)
    afs = defaults["afs"].default if afs is None else afs
    if afs is None:
        afs = getattr(solvers, "AUTO_AFS", {}).get(solver, False)
    return solver, nfe, steps, grid, bool(afs)


def generate(model, seeds, outdir, *, model_info: dict | None = None, batch: int = 64, solver=None, nfe=None,
             steps=None, grid=None, afs=None, denoise: bool = False, labels=None, guidance_scale=None,
             fmt: str = "npz", device=None, progress: bool = True) -> dict:
    """Sample one image per seed into ``outdir`` (see the module docstring); returns the manifest.

    model: an eps model (``.schedule``, ``.image_shape``); labels: None, an int class or "cycle";
    guidance_scale: classifier-free guidance scale (diffusers convention) with labels.
    Call it on every rank of a torchrun job (or alone)."""
    from .checks import check_int, check_number
    from .guidance import DEFAULT_GUIDANCE_SCALE, Conditioned, check_labels
    from .sampling import sample

    if fmt not in ("npz", "png"):
        raise ValueError(f"--format must be npz or png, got {fmt!r}")
    check_int("--batch", batch, 1)
    seeds = [check_int("seeds", s, 0) for s in seeds]
    if seeds and max(seeds) >= 2 ** 32:
        raise ValueError(f"seeds must be below 2**32 (torch's CPU generator keeps 32 bits), got {max(seeds)}")
    if not seeds:
        raise ValueError("no seeds to sample")
    if len(set(seeds)) != len(seeds):
        raise ValueError("seeds: a seed appears twice (each seed names one image)")
    if guidance_scale is not None:
        check_number("--guidance-scale", guidance_scale)
    if guidance_scale is not None and labels is None:
        raise ValueError("--guidance-scale needs --labels (guidance mixes conditional and unconditional predictions)")
    solver, nfe, steps, grid, afs = _resolve(solver, nfe, steps, grid, afs)
    image_shape = tuple(int(d) for d in model.image_shape)
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if labels is not None:
        if labels == "cycle":
            if num_classes <= 0:
                raise ValueError("--labels was given but the model is not class-conditional")
        else:
            check_labels(int(labels), 1, num_classes)  # refuses an unconditional model or a bad class by name
        if guidance_scale is None:  # as genie_fast.guidance.conditioned: labels alone mean the default scale
            guidance_scale = DEFAULT_GUIDANCE_SCALE
    device = _device(device)
    info = dict(model_info or {})
    info.setdefault("sha256", weights_hash(model) if isinstance(model, torch.nn.Module) else None)
    identity = {"model_sha256": info["sha256"], "solver": solver, "nfe": nfe, "steps": steps,
                "grid": grid if isinstance(grid, str) else [float(t) for t in grid], "afs": afs,
                "denoise": bool(denoise), "labels": labels, "guidance_scale": guidance_scale,
                "image_shape": list(image_shape), "format": fmt}

    outdir = Path(outdir)
    folder = _Folder(outdir, fmt)
    dist = _Dist(device)
    try:
        manifest_path = outdir / "manifest.json"
        plan = None
        if dist.rank == 0:
            try:
                plan = _plan(outdir, folder, manifest_path, identity, info, seeds, batch)
            except Exception as e:  # every rank must hear of it, not wait forever
                plan = f"{outdir}: {type(e).__name__}: {e}"
        plan = dist.broadcast(plan)
        if isinstance(plan, str):
            raise ValueError(plan)
        chunks = plan["chunks"]

        if isinstance(model, torch.nn.Module):
            model = model.to(device)
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

        cond, nfe_spent, tag = None, None, f"{dist.rank}-{os.getpid()}"
        for chunk in chunks[dist.rank::dist.world]:
            noise = seed_noise(chunk, image_shape).to(device)
            chunk_labels = _labels_for(chunk, labels, num_classes)
            eps_model = model
            if chunk_labels is not None:
                lab = check_labels(chunk_labels, len(chunk), num_classes, device)
                if cond is None or cond.labels.shape != lab.shape:
                    cond = Conditioned(model, lab, guidance_scale)
                else:
                    cond.update(lab, guidance_scale)
                eps_model = cond
            kw = {"nfe": nfe} if steps is None else {"steps": steps}
            x0, nfe_spent = sample(eps_model, noise=noise, solver=solver, grid=grid, afs=afs, denoise=denoise,
                                   device=device, **kw)
            folder.write(chunk, to_uint8(x0), chunk_labels, tag)
            refresh()
        dist.barrier(refresh if bar is not None else None)

        result = None
        if dist.rank == 0:
            refresh()
            if bar is not None:
                bar.close()
            result = _finish(outdir, folder, manifest_path, plan["manifest"], nfe_spent, dist.world, labels)
        return dist.broadcast(result)
    finally:
        dist.close()


def _plan(outdir: Path, folder: _Folder, manifest_path: Path, identity: dict, info: dict, seeds, batch):
    """Rank 0: check the folder against this run, write the manifest, list the chunks still to do.
    Returns a dict, or an error message that every rank raises."""
    outdir.mkdir(parents=True, exist_ok=True)
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as e:
            return f"{manifest_path}: not valid JSON ({e}); move it away or use another --outdir"
        if old.get("format") != FORMAT:
            return f"{manifest_path} is not a genie_fast.generate manifest; use another --outdir"
        diff = [f"{k}: folder has {old['identity'].get(k)!r}, this run {identity[k]!r}"
                for k in IDENTITY_KEYS if old.get("identity", {}).get(k) != identity[k]]
        if diff:
            return (f"{outdir} holds samples of other settings; refusing to mix them ("
                    + "; ".join(diff) + "). Use another --outdir.")
        manifest = old
    else:
        manifest = {"format": FORMAT, "version": VERSION, "identity": identity,
                    "model": info, "versions": _versions(), "status": "running"}
        _atomic_bytes(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode(), "0")
    folder.remove_stale_tmp()
    done = folder.done_seeds()
    todo = [s for s in seeds if s not in done]
    chunks = [todo[i:i + batch] for i in range(0, len(todo), batch)]
    return {"chunks": chunks, "manifest": manifest}


def _finish(outdir: Path, folder: _Folder, manifest_path: Path, manifest: dict, nfe_spent, world: int, labels):
    samples = outdir / "samples.npz"
    n = _write_samples_npz(folder, samples, None)
    done = folder.done_seeds()
    manifest = dict(manifest)
    manifest.update({"status": "complete", "count": n, "seeds": format_seeds(done),
                     "nfe_per_sample": nfe_spent if nfe_spent is not None else manifest.get("nfe_per_sample"),
                     "last_world_size": world, "versions": _versions(),
                     "samples": {"path": samples.name, "arrays": {"arr_0": "uint8 NHWC, RGB",
                                                                  "seeds": "int64, ascending"}
                                 | ({"arr_1": "int64 labels"} if labels is not None else {})}})
    _atomic_bytes(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode(), "0")
    return manifest


# --------------------------------------------------------------------------- command line

def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="genie-fast generate", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", required=True, help="seeds, e.g. 0-49999 or 0-9,100-109 (one image each)")
    p.add_argument("--outdir", required=True, help="output folder (resumable; see genie_fast.generate)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="genie_fast model stem (default: the bundled model)")
    src.add_argument("--diffusers", default=None, metavar="DIR",
                     help="a diffusers UNet2DModel folder (its genie_head.* is loaded when present)")
    p.add_argument("--batch", type=int, default=64, help="images per network call and per file")
    p.add_argument("--solver", default=None, help="default: genie_fast's default solver")
    p.add_argument("--nfe", type=int, default=None, help="NFE budget per image (default: genie_fast's)")
    p.add_argument("--steps", type=int, default=None, help="number of steps instead of --nfe")
    p.add_argument("--grid", default=None, help="auto | logsnr | quadratic | uniform | edm (default: auto)")
    p.add_argument("--afs", action=argparse.BooleanOptionalAction, default=None,
                   help="analytical first step (default: per solver)")
    p.add_argument("--denoise", action="store_true", help="final denoising step (+1 NFE)")
    p.add_argument("--labels", default=None, help="class-conditional models: a class index, or 'cycle' (seed mod K)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance scale, diffusers convention (with --labels; default 2, 1 = none)")
    p.add_argument("--format", default="npz", choices=("npz", "png"), help="per-batch files (default npz)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument("--no-progress", action="store_true")
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
    """Refuse bad arguments and an unusable --outdir before a model is loaded (one line each)."""
    from .checks import check_int, check_number, check_out_dir
    from .schedule import GRIDS
    from .solvers import SOLVERS

    check_out_dir(args.outdir, "--outdir")
    _device(args.device)
    check_int("--threads", args.threads, 0)
    check_int("--batch", args.batch, 1)
    for flag in ("nfe", "steps"):
        if getattr(args, flag) is not None:
            check_int("--" + flag, getattr(args, flag), 1)
    if args.nfe is not None and args.steps is not None:
        raise ValueError("give --nfe or --steps, not both")
    if args.solver is not None and args.solver not in SOLVERS:
        raise ValueError(f"--solver {args.solver!r} is not a solver; choose one of {sorted(SOLVERS)}")
    if args.grid is not None and args.grid not in ("auto", *GRIDS):
        raise ValueError(f"--grid {args.grid!r} is not a grid; choose one of {('auto', *GRIDS)}")
    if args.guidance_scale is not None:
        check_number("--guidance-scale", args.guidance_scale)
    labels = args.labels
    if labels is not None and labels != "cycle":
        try:
            labels = check_int("--labels", int(labels), 0)
        except ValueError:
            raise ValueError(f"--labels must be a class index (0, 1, ...) or 'cycle', got {labels!r}") from None
    return parse_seeds(args.seeds), labels


def run(args) -> dict:
    seeds, labels = check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, info = load_for_generate(args.model, args.diffusers)
    manifest = generate(model.eval(), seeds, args.outdir, model_info=info, batch=args.batch,
                        solver=args.solver, nfe=args.nfe, steps=args.steps, grid=args.grid, afs=args.afs,
                        denoise=args.denoise, labels=labels, guidance_scale=args.guidance_scale, fmt=args.format,
                        device=args.device, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {Path(args.outdir) / 'samples.npz'} ({manifest['count']} samples, "
              f"{manifest['identity']['solver']}, {manifest['nfe_per_sample']} NFE each)")
    return manifest


def main(argv=None):
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
