"""Where and in what precision: dtype names (`DTYPES`, `as_dtype`), the TF32 switches (`no_tf32`,
`tf32_flags`), the CPU's bf16 (`cpu_bf16_native`, `cpu_net_dtype`), and the one device rule of the
library and the command line (`default_device`, `command_device`)."""
from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch

from .checks import check_device

__all__ = ["DTYPES", "as_dtype", "no_tf32", "tf32_flags", "cpu_bf16_native", "cpu_net_dtype", "model_device",
           "default_device", "command_device"]

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


CPU_BF16_ENV = "GENIE_FAST_CPU_BF16"  # "1": treat the CPU as bf16-capable, "0": as not (else detected)
_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # /proc/cpuinfo: x86 AVX512-BF16 or AMX; aarch64 BF16
_notices: set = set()


@functools.lru_cache(maxsize=None)
def _detect_cpu_bf16(cpuinfo: str = "/proc/cpuinfo", probes=("_is_avx512_bf16_supported", "_is_amx_tile_supported")) -> bool:
    for name in probes:  # torch's own cpuinfo probes, then the kernel's flags
        probe = getattr(torch.cpu, name, None)
        try:
            if probe is not None and probe():
                return True
        except Exception:  # pragma: no cover - a torch whose probe fails: read the flags instead
            pass
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.split(":")[0].strip().lower() in ("flags", "features") and \
                        set(line.split(":", 1)[-1].split()) & set(_BF16_FLAGS):
                    return True
    except OSError:
        pass
    return False


def cpu_bf16_native() -> bool:
    """Whether this CPU does bf16 arithmetic natively (x86 AVX512-BF16 or AMX, aarch64 BF16), detected
    from torch's CPU probes and /proc/cpuinfo, never assumed. Elsewhere bf16 convolutions are emulated
    and slow (on this project's AVX2-only EPYC 3.7x float32's time at batch 1, about 26x at batch 16:
    bench/RESULTS.md, "The CPU path").
    ``GENIE_FAST_CPU_BF16=1`` / ``=0`` overrides the detection (=1 on a CPU without it: emulated bf16,
    for accuracy measurements only)."""
    env = os.environ.get(CPU_BF16_ENV, "").strip()
    if env in ("0", "1"):
        return env == "1"
    return _detect_cpu_bf16()


def cpu_net_dtype(dtype: torch.dtype) -> torch.dtype:
    """The network dtype a CPU run uses when `dtype` is asked for: float16 is refused (ATen's CPU
    half-precision convolutions are slow); bfloat16 where the CPU has it natively
    (`cpu_bf16_native`), else float32 with a one-line notice (once per process); others as asked."""
    if dtype == torch.float16:
        raise ValueError("a float16 network on the CPU is refused (ATen's CPU float16 convolutions are slow and "
                         "not what this library measures): use net_dtype=bfloat16 (where the CPU has native bf16) "
                         "or float32 there, float16 on a GPU")
    if dtype == torch.bfloat16 and not cpu_bf16_native():
        if "bf16" not in _notices:
            _notices.add("bf16")
            warnings.warn("genie_fast: this CPU has no native bf16 arithmetic (no avx512_bf16 / amx_bf16); "
                          "the network runs in float32", UserWarning, stacklevel=2)
        return torch.float32
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
