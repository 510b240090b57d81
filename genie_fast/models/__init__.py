"""Eps models: the exact-score Gaussian mixture, the U-Net score network, the GENIE head, and
diffusers UNet2DModels (`from_diffusers`, `load_diffusers`; needs the optional diffusers extra)."""
import importlib

_LAZY = {
    "GaussianMixture": ".gmm",
    "UNet": ".unet",
    "GenieHead": ".head",
    "GenieModel": ".head",
    "HeadConfig": ".head",
    "UNetConfig": ".unet",
    "CONFIGS": ".unet",
    "load_default": ".default",
    "load_model": ".default",
    "save_model": ".default",
    "ModelFileError": ".default",
    "from_diffusers": ".diffusers",
    "load_diffusers": ".diffusers",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'genie_fast.models' has no attribute {name!r}")


__all__ = list(_LAZY)
