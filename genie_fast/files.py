"""What goes in and out of files, at the bottom of the package (any module may import it):

* `to_uint8` / `from_uint8`: images in the model's range [-1, 1] (float, NCHW) <-> 8-bit images
  (uint8, NHWC), the one conversion behind PNG grids, ``generate``'s batch files, Fashion-MNIST
  and ``distill --diffusers`` training images;
* `weights_hash`: the sha256 of a module's weights that names a network in manifests and head files;
* `png_bytes` / `read_png`: 8-bit images <-> PNG files, with Pillow (the optional extra
  ``genie_fast[images]``, imported when a PNG is written or read: `checks.require`).
"""
from __future__ import annotations

import hashlib
import io

import numpy as np
import torch

from .checks import require

__all__ = ["to_uint8", "from_uint8", "weights_hash", "png_bytes", "read_png", "PNG_NEEDS"]

PNG_NEEDS = "writing or reading PNG files (genie-fast sample, encode --images / --reconstruct, generate --format png)"


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 (H, W, C) image (C = 1: grey, 3: RGB) as PNG file bytes."""
    image_mod = require("PIL.Image", PNG_NEEDS)
    buf = io.BytesIO()
    image_mod.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def read_png(path, mode: str | None = None) -> np.ndarray:
    """An image file as uint8, (H, W) or (H, W, C); mode: a Pillow mode to convert to ("L": grey)."""
    image_mod = require("PIL.Image", PNG_NEEDS)
    with image_mod.open(path) as im:
        return np.array(im if mode is None else im.convert(mode), dtype=np.uint8)  # (a writable copy)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C), rounded to the nearest level."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def from_uint8(images_u8) -> torch.Tensor:
    """uint8 (B, H, W, C) (a numpy array or a CPU tensor) -> float32 (B, C, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images_u8)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 of a module's state (names, dtypes, shapes and bytes of every tensor, sorted by name)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # any layout
    return h.hexdigest()
