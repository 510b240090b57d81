"""The sample store of ``genie-fast generate``: one output folder, its manifest and files.

* ``manifest.json``: what was sampled (`IDENTITY_KEYS`: model sha256, solver, NFE or steps, grid,
  AFS, denoising, labels, guidance scale, image shape, format, the conditioning files' content
  hashes where given; and versions). A folder whose
  manifest describes other sampling is refused (`open_run`); at the end (`finish`) it records
  counts and NFE spent.
* ``batches/<first seed>_<count>.npz`` (npz: seeds, uint8 NHWC images, labels) or
  ``images/<seed>.png`` (png), each written to a temporary name and renamed when complete
  (`Folder.write`), so a kill -9 loses only the batches in flight.
* ``samples.npz`` (`write_samples_npz`): all samples in ascending seed order in the layout FID
  tools read: ``arr_0`` uint8 NHWC (grayscale repeated to RGB), ``arr_1`` labels of a
  class-conditional run, ``seeds``.
"""
from __future__ import annotations

import io
import json
import os
import platform
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from .files import png_bytes, read_png

__all__ = ["FORMAT", "VERSION", "IDENTITY_KEYS", "Folder", "open_run", "finish", "write_samples_npz",
           "format_seeds"]

FORMAT = "genie_fast.generate"
VERSION = 1
IDENTITY_KEYS = ("model_sha256", "solver", "nfe", "steps", "grid", "afs", "denoise", "labels", "guidance_scale",
                 "image_shape", "format", "net_dtype", "cond_sha256", "negative_cond_sha256")
_BATCH_FILE = re.compile(r"^(\d+)_(\d+)\.npz$")
_PNG_FILE = re.compile(r"^(\d+)\.png$")


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


def atomic_bytes(path: Path, data: bytes, tag: str):
    tmp = path.with_name(f"{path.name}.tmp-{tag}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
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


class Folder:
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
            atomic_bytes(self.data / f"{seeds[0]}_{len(seeds)}.npz", _npz_bytes(**arrays), tag)
        else:
            for s, image in zip(seeds, images):
                atomic_bytes(self.data / f"{s}.png", png_bytes(image), tag)

    def records(self):
        """Yields (seeds, images uint8 NHWC, labels or None) per file."""
        if self.fmt == "npz":
            for n in sorted(self.names()):
                with np.load(self.data / n) as f:
                    yield f["seeds"], f["images"], (f["labels"] if "labels" in f else None)
        else:
            for n in sorted(self.names()):
                a = read_png(self.data / n)
                yield np.array([int(_PNG_FILE.match(n).group(1))]), (a[None, ..., None] if a.ndim == 2 else a[None]), None


def write_samples_npz(folder: Folder, path: Path) -> int:
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


def open_run(outdir: Path, folder: Folder, manifest_path: Path, identity: dict, info: dict, seeds, batch):
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
        diff = [f"{k}: folder has {old['identity'].get(k)!r}, this run {identity.get(k)!r}"
                for k in IDENTITY_KEYS if old.get("identity", {}).get(k) != identity.get(k)]
        if diff:
            return (f"{outdir} holds samples of other settings; refusing to mix them ("
                    + "; ".join(diff) + "). Use another --outdir.")
        manifest = old
    else:
        manifest = {"format": FORMAT, "version": VERSION, "identity": identity,
                    "model": info, "versions": _versions(), "status": "running"}
        atomic_bytes(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode(), "0")
    folder.remove_stale_tmp()
    done = folder.done_seeds()
    todo = [s for s in seeds if s not in done]
    chunks = [todo[i:i + batch] for i in range(0, len(todo), batch)]
    return {"chunks": chunks, "manifest": manifest}


def finish(outdir: Path, folder: Folder, manifest_path: Path, manifest: dict, nfe_spent, world: int, labels):
    samples = outdir / "samples.npz"
    n = write_samples_npz(folder, samples)
    done = folder.done_seeds()
    manifest = dict(manifest)
    manifest.update({"status": "complete", "count": n, "seeds": format_seeds(done),
                     "nfe_per_sample": nfe_spent if nfe_spent is not None else manifest.get("nfe_per_sample"),
                     "last_world_size": world, "versions": _versions(),
                     "samples": {"path": samples.name, "arrays": {"arr_0": "uint8 NHWC, RGB",
                                                                  "seeds": "int64, ascending"}
                                 | ({"arr_1": "int64 labels"} if labels is not None else {})}})
    atomic_bytes(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode(), "0")
    return manifest
