"""What goes in and out of files, at the bottom of the package (any module may import it):

* `to_uint8` / `from_uint8`: images in the model's range [-1, 1] (float, NCHW) <-> 8-bit images
  (uint8, NHWC), the one conversion behind PNG grids, ``generate``'s batch files, Fashion-MNIST
  and ``distill --diffusers`` training images;
* `weights_hash`: the sha256 of a module's weights that names a network in manifests and head files.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

__all__ = ["to_uint8", "from_uint8", "weights_hash"]


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
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
