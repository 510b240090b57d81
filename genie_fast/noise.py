"""Seeds and noise, in one place: the range of a seed (`check_seed`, `check_seeds`), the x_T of a
batch seed (`make_noise`) and of per-image seeds (`seed_noise`), and the start state of a call
(`initial_state`: given noise, or noise drawn from seeds).

Noise is drawn on the CPU in float32 and then moved and cast, so a seed gives the same x_T on
every device. Seeds are ints in [0, 2**32): torch's CPU generator (mt19937) keeps only the low 32
bits of a seed, so 2**32 would repeat seed 0."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .checks import check_int
from .devices import as_dtype

__all__ = ["SEED_LIMIT", "check_seed", "check_seeds", "make_noise", "seed_noise", "initial_state"]

SEED_LIMIT = 2 ** 32


def check_seed(name: str, seed) -> int:
    """`seed` as an int in [0, 2**32) (a bool, float or string is refused)."""
    seed = check_int(name, seed)
    if not 0 <= seed < SEED_LIMIT:
        why = f": {seed} would draw the noise of {seed % SEED_LIMIT}" if seed >= SEED_LIMIT else ""
        raise ValueError(f"{name} must be in [0, 2**32) (torch's CPU generator keeps 32 bits of a seed{why}), "
                         f"got {seed}")
    return seed


def check_seeds(name: str, seeds, *, unique: bool = False) -> list[int]:
    """`seeds` as a non-empty list of `check_seed` ints; unique: each seed names one image, none twice."""
    seeds = [check_seed(name, s) for s in seeds]
    if not seeds:
        raise ValueError(f"{name}: no seeds (give at least one seed)")
    if unique and len(set(seeds)) != len(seeds):
        raise ValueError(f"{name}: a seed appears twice (each seed names one image)")
    return seeds


def seed_noise(seeds, shape, dtype=torch.float32, device=None) -> torch.Tensor:
    """(len(seeds), *shape) standard normal noise, row k drawn in float32 on the CPU from its own
    ``torch.Generator().manual_seed(seeds[k])``: the one definition of a per-image seed's x_T
    (``sample(seeds=)`` and ``genie-fast generate``), the same whatever the batch around it, its
    order, or the device. Seeds are ints in [0, 2**32)."""
    rows = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(s), dtype=torch.float32)
            for s in check_seeds("seeds", seeds)]
    return torch.stack(rows).to(device=device, dtype=dtype)


def make_noise(n: int, shape, seed: int = 0, dtype=torch.float32, device=None) -> torch.Tensor:
    """(n, *shape) standard normal noise of batch seed `seed` (an int in [0, 2**32)): one CPU
    generator seeded `seed` draws the samples one after another (float32), so sample i does not
    depend on n or the device, and two seeds' batches share no sample (different streams). The
    first sample of seed s is ``seed_noise([s])``, the image of per-image seed s."""
    n, generator = check_int("n", n, 1), torch.Generator().manual_seed(check_seed("seed", seed))
    rows = [torch.randn(tuple(shape), generator=generator, dtype=torch.float32) for _ in range(n)]
    return torch.stack(rows).to(device=device, dtype=dtype)


def initial_state(noise, n, shape, seed, dtype, seeds, device, image_shape, name: str = "noise") -> torch.Tensor:
    """x_T of a call on `device` in the state dtype: the given noise, or n samples of batch seed
    `seed`, or one sample per per-image seed of `seeds`. shape: the call's image shape or None;
    image_shape: a function giving the model's image shape (asked only where noise is drawn)."""
    if dtype is not None:
        dtype = as_dtype(dtype, (torch.float32, torch.float64), "dtype (the ODE state's and the samples'; "
                         "the network's precision is net_dtype)")
    if seeds is not None:
        if noise is not None or seed != 0:
            raise ValueError("seeds= gives every sample its own seed: give it without noise= and seed=")
        if isinstance(seeds, (str, bytes)) or not isinstance(seeds, (Sequence, range, torch.Tensor)):
            raise TypeError(f"seeds must be a sequence of ints, got {type(seeds).__name__}")
        seeds = seeds.tolist() if isinstance(seeds, torch.Tensor) else list(seeds)
        if n is not None and n != len(seeds):
            raise ValueError(f"n={n} disagrees with the {len(seeds)} seeds given")
        return seed_noise(seeds, shape if shape is not None else image_shape(), dtype or torch.float32, device)
    if noise is None:
        if n is None:
            raise ValueError("give noise=, or n= a positive number of samples (and optionally shape and "
                             "seed), or seeds=")
        n = check_int("n", n, 1)
        return make_noise(n, shape if shape is not None else image_shape(), seed, dtype or torch.float32, device)
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {type(noise).__name__}"
                        + (f" of dtype {noise.dtype}" if isinstance(noise, torch.Tensor) else ""))
    if noise.dim() < 2 or noise.shape[0] < 1 or noise.numel() == 0:
        raise ValueError(f"{name} must be (B, C, ...) with B >= 1 and no empty dimension, got {tuple(noise.shape)}")
    if n is not None and n != noise.shape[0]:
        raise ValueError(f"n={n} disagrees with {name}'s batch size {noise.shape[0]}")
    if shape is not None and tuple(noise.shape[1:]) != tuple(shape):
        raise ValueError(f"{name} must have shape (B, *{tuple(shape)}), got {tuple(noise.shape)}")
    dtype = dtype or (torch.float64 if noise.dtype == torch.float64 else torch.float32)
    return noise.to(device, dtype)
