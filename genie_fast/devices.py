"""Where and in what precision: dtype names (`DTYPES`, `as_dtype`), the TF32 switches (`no_tf32`,
`tf32_flags`), and the one device rule of the library and the command line (`default_device`,
`command_device`)."""
from __future__ import annotations

import contextlib
import os

import torch

from .checks import check_device

__all__ = ["DTYPES", "as_dtype", "no_tf32", "tf32_flags", "model_device", "default_device", "command_device"]

DTYPES = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
          "fp64": torch.float64, "float64": torch.float64, "double": torch.float64}


def as_dtype(dtype, allowed, what) -> torch.dtype:
    """`dtype` (a torch dtype or a name of `DTYPES`) checked against `allowed`; `what` names it in errors."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown {what} {dtype!r}; choose one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype not in allowed:
        raise ValueError(f"{what} must be one of {[str(d).replace('torch.', '') for d in allowed]}, got {dtype}")
    return dtype


@contextlib.contextmanager
def no_tf32():
    """True float32 convolutions inside (for fp32 references): cuDNN's TF32, on by default in
    PyTorch, is switched off and restored after. cuBLAS matmuls are left alone (no TF32 unless the
    user asked for it). Uses the legacy flag, which keeps torch's conv/rnn precision flags
    consistent; where the user set them apart with the new `fp32_precision` API, that API."""
    cudnn = torch.backends.cudnn
    try:
        old = cudnn.allow_tf32
    except RuntimeError:  # the new API was used to set conv and rnn apart: stay with it
        old_conv = cudnn.conv.fp32_precision
        cudnn.conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            cudnn.conv.fp32_precision = old_conv
        return
    cudnn.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32 = old


def tf32_flags() -> tuple:
    """What decides whether float32 matmuls and convolutions run as TF32 (part of an fp32 graph's key)."""
    b = torch.backends
    try:
        return (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision)
    except (AttributeError, RuntimeError):  # torch without the fp32_precision API
        return (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)


def model_device(model) -> torch.device | None:
    """The device of the first parameter or buffer of an ``nn.Module``; None for anything else."""
    if isinstance(model, torch.nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return None


def default_device(model=None, like=None) -> torch.device:
    """The one device rule, where no device is given: the device of the model's tensors (an
    ``nn.Module`` with parameters or buffers), else that of `like` (the noise or data tensor of
    the call), else CUDA when available, else the CPU.

    ``genie_fast.sample`` / ``encode`` pass the model and the noise or data; `SamplingEngine` and
    the commands (which load their models on the CPU) pass nothing: CUDA when available."""
    device = model_device(model)
    if device is not None:
        return device
    if isinstance(like, torch.Tensor):
        return like.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def command_device(spec=None, name: str = "--device") -> torch.device:
    """The device of a command's ``--device`` flag: `spec` checked (`check_device`), or where it is
    None or "auto", `default_device()`; a CUDA device without an index is torchrun's
    ``cuda:LOCAL_RANK`` when LOCAL_RANK is set."""
    device = default_device() if spec in (None, "auto") else check_device(spec, name)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device
