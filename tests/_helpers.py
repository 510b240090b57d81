"""Small helpers shared by several test modules."""
import torch


def exact_head_kw(name: str, model) -> dict:
    """sample() keywords of solver ``name`` on an exact-score model: genie gets an ideal head (the
    exact d eps/d gamma, what a perfectly distilled head would give), genie_multistep with it
    trusted as exact; other solvers need none."""
    head = {"head": lambda x, t, eps: model.exact_deps(x, t)}
    return {"genie": head, "genie_multistep": dict(head, head_error=0.0)}.get(name, {})


def randomize(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn from N(0, std^2): the output conv and residual branches start at zero,
    random weights make the tests meaningful."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny_cond_model(seed: int = 0):
    """A tiny class-conditional GenieModel (1x8x8, 3 classes), random weights of std 0.05."""
    from genie_fast.models.head import GenieModel
    from genie_fast.models.unet import UNet, UNetConfig

    torch.manual_seed(seed)
    cfg = UNetConfig(in_channels=1, image_size=8, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                     num_classes=3)
    return randomize(GenieModel(UNet(cfg)).eval(), 0.05)


def write_idx(path, arr, gz: bool = True):
    """Write a uint8 array as an IDX file (gzipped unless gz=False), the format of Fashion-MNIST."""
    import gzip
    import struct

    import numpy as np

    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(header + np.asarray(arr).astype(np.uint8).tobytes())


def bench_module(name: str, reload: bool = False):
    """A script of bench/ imported as a module (bench/ on sys.path only while importing, so its own
    `import _step_bench` resolves); reload=True imports it afresh (after an environment change)."""
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    try:
        module = importlib.import_module(name)
        return importlib.reload(module) if reload else module
    finally:
        sys.path.pop(0)
