"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist``, with no download path.

``apt-get install -y dataset-fashion-mnist`` puts gzipped IDX files in
``/usr/share/datasets/fashion-mnist/``. Images are padded 28 -> 32 with background and scaled to
[-1, 1], as float32 tensors of shape (N, 1, 32, 32).
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

from .files import from_uint8

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


class DataMissingError(FileNotFoundError):
    pass


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or not) into a numpy uint8 array of its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, OSError, gzip.BadGzipFile) as e:  # a truncated or corrupted .gz
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic)")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != 0x08:
        raise ValueError(f"{path}: IDX dtype 0x{dtype_code:02x} unsupported (only unsigned byte)")
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes for {ndim} dimensions)")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    offset = 4 + 4 * ndim  # 16 for images, 8 for labels
    data = np.frombuffer(raw, dtype=np.uint8, offset=offset)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} values, found {data.size}")
    return data.reshape(shape).copy()  # writable, detached from the file buffer


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).exists():
            return root / name
    raise DataMissingError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}. Install it with "
        f"`apt-get install -y dataset-fashion-mnist` or pass root=/dir/with/idx/files "
        f"(env GENIE_FAST_DATA also works).")


def to_model_range(images_u8: np.ndarray | torch.Tensor, pad_to: int = 32) -> torch.Tensor:
    """uint8 (N, H, W) -> float32 (N, 1, pad_to, pad_to) in [-1, 1], padded with background (-1)."""
    dtype = getattr(images_u8, "dtype", None)
    if dtype not in (np.uint8, torch.uint8):  # float images in [0, 1] would silently become all black
        raise TypeError(f"images must be a uint8 array (0..255), got dtype {dtype}")
    if images_u8.ndim != 3:
        raise ValueError(f"images must be (N, H, W), got shape {tuple(images_u8.shape)}")
    x = from_uint8(np.asarray(images_u8)[..., None])
    ph, pw = pad_to - x.shape[-2], pad_to - x.shape[-1]
    if ph < 0 or pw < 0:
        raise ValueError(f"images {tuple(x.shape[-2:])} larger than pad_to={pad_to}")
    return torch.nn.functional.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=-1.0)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None,
                       pad_to: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (images float32 (N, 1, 32, 32) in [-1, 1], labels int64 (N,))."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root or os.environ.get("GENIE_FAST_DATA", DEFAULT_ROOT))
    images = read_idx(_find(root, _FILES[(split, "images")]))
    labels = read_idx(_find(root, _FILES[(split, "labels")]))
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels")
    return to_model_range(images, pad_to), torch.from_numpy(labels.astype(np.int64))


def infinite_batches(data: torch.Tensor, batch_size: int, generator: torch.Generator,
                     hflip: bool = True, labels: torch.Tensor | None = None):
    """Yields random batches forever (reshuffled each epoch), with optional horizontal flips.

    With ``labels`` (N,) it yields ``(images, labels)`` pairs, else images alone."""
    n = data.shape[0]
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if n < batch_size:
        raise ValueError(f"dataset has {n} images, fewer than batch_size={batch_size}")
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match {n} images")
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            x = data[idx]
            if hflip:
                flip = torch.rand(batch_size, generator=generator) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            yield x if labels is None else (x, labels[idx])
