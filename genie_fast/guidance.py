"""Class labels and classifier-free guidance as one eps model the solvers call like any other.

A class-conditional network (``model.num_classes = K > 0``; label K is the null class, "no label")
is wrapped in :class:`Conditioned`, which the solvers and the CUDA-graph engine see as a plain
eps model ``eps(x, t)`` with ``eps_and_head(x, t)`` when the network has a GENIE head.

Guidance (Ho & Salimans 2022), in the diffusers convention for the scale s:

    eps = eps_u + s (eps_c - eps_u)        (s = 1: conditional only; s = 0: unconditional)

GENIE's paper writes the same with w = s - 1. The two branches run as ONE batched network call on
2B inputs (conditional labels, then the null label), so a guided step costs two network
evaluations per sample and one batched call; ``evals_per_call = 2`` says so to the NFE counting.
With s = 1 the unconditional branch is skipped (one evaluation per call).

The derivative GENIE needs is combined the same way from the two branches' distilled heads:
raw head outputs [h1|h2|h3] are linear in d eps / d gamma at fixed gamma, so

    head = head_u + s (head_c - head_u).

This is not the exact derivative of the guided eps along the guided trajectory: each head was
distilled along its own branch's ODE, so the combination misses

    s (s - 1) / sqrt(1 + gamma^2) (J_c - J_u)(eps_c - eps_u)        (J: the branches' x-Jacobians)

(docs/method.md derives it; ``bench/bench_guidance.py`` measures its size on the bundled model
and ``tests/test_guidance.py`` checks the combination against the exact JVP of the guided eps).

Labels and the scale live in buffers of the wrapper. :meth:`Conditioned.update` copies new values
into them in place, so a captured CUDA graph that reads them replays with the new values without
a new capture (the structure, guided or not, is fixed at construction).
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["Conditioned", "conditioned", "check_labels", "check_scale", "DEFAULT_GUIDANCE_SCALE"]

# Default scale when labels are given without guidance_scale (measured on the bundled model:
# bench/RESULTS.md, "Guidance").
DEFAULT_GUIDANCE_SCALE = 2.0


def _num_classes(model) -> int:
    k = getattr(model, "num_classes", 0)
    return int(k) if k else 0


def check_labels(labels, batch: int, num_classes: int, device=None) -> torch.Tensor:
    """labels (an int or a 1-D integer tensor/sequence of length batch) -> LongTensor (batch,).

    Raises ValueError naming the problem (unconditional model, wrong length, out of range)."""
    if num_classes <= 0:
        raise ValueError("labels were given but the model is not class-conditional (num_classes = 0)")
    if isinstance(labels, bool):
        raise TypeError(f"labels must be an int or a sequence/tensor of ints, got {labels!r}")
    if isinstance(labels, int):
        labels = torch.full((batch,), labels, dtype=torch.long)
    else:
        labels = torch.as_tensor(labels)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
        if labels.dim() == 0:
            labels = labels.expand(batch)
        if labels.shape != (batch,):
            raise ValueError(f"labels must be one int or shape ({batch},) for {batch} samples, "
                             f"got shape {tuple(labels.shape)}")
    labels = labels.to(dtype=torch.long)
    bad = (labels < 0) | (labels > num_classes)
    if bool(bad.any()):
        raise ValueError(f"labels must be in 0..{num_classes - 1} (or {num_classes}, the null class), "
                         f"got {labels[bad][:5].tolist()}")
    return labels.to(device) if device is not None else labels


class Conditioned(nn.Module):
    """A class-conditional eps model with fixed labels and (optionally) classifier-free guidance.

    model: a network called as ``model(x, t, labels=...)`` (and ``model.eps_and_head(x, t, labels)``
    for GENIE), with ``num_classes`` > 0. labels: LongTensor (B,) in 0..num_classes.
    guidance_scale: the diffusers-convention scale s; ``None`` or 1 means conditional only.
    """

    def __init__(self, model, labels: torch.Tensor, guidance_scale: float | None = None):
        super().__init__()
        k = _num_classes(model)
        if k <= 0:
            raise ValueError("the model is not class-conditional (num_classes = 0): labels and guidance need one")
        self.model = model
        self.num_classes = k
        self.guided = guidance_scale is not None and float(guidance_scale) != 1.0
        self.evals_per_call = 2 if self.guided else 1
        # the scale as a number on the host: the key of a tuned grid (`grid_store`), never read on the device
        self.guidance_value = 1.0 if guidance_scale is None else float(guidance_scale)
        device = labels.device
        self.register_buffer("labels", labels.to(torch.long).clone(), persistent=False)
        self.register_buffer("scale", torch.tensor(1.0 if guidance_scale is None else float(guidance_scale),
                                                   dtype=torch.float32, device=device), persistent=False)
        self.register_buffer("null", torch.full_like(self.labels, k), persistent=False)
        self.schedule = getattr(model, "schedule", None)
        self.image_shape = getattr(model, "image_shape", None)
        if hasattr(model, "head_error"):  # genie_multistep's trust in the head (the mix is no exact head)
            self.head_error = model.head_error
        if not callable(getattr(model, "eps_and_head", None)):
            self.eps_and_head = None  # genie then asks for head= or refuses, as for any eps model

    def update(self, labels: torch.Tensor, guidance_scale: float | None = None):
        """Copy new labels / scale into the buffers in place (a captured graph sees them)."""
        if labels.shape != self.labels.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} differs from {tuple(self.labels.shape)}")
        guided = guidance_scale is not None and float(guidance_scale) != 1.0
        if guided != self.guided:
            raise ValueError("update cannot switch between guided and unguided sampling; make a new Conditioned")
        self.labels.copy_(labels)
        self.guidance_value = 1.0 if guidance_scale is None else float(guidance_scale)
        self.scale.fill_(self.guidance_value)

    def _both(self, x, t):
        """Inputs of the one batched call: [conditional | null] halves."""
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        return torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.labels, self.null])

    def _mix(self, both: torch.Tensor) -> torch.Tensor:
        cond, uncond = both.chunk(2)
        s = self.scale.to(both.dtype)
        return uncond + s * (cond - uncond)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        if not self.guided:
            return self.model(x, t, labels=self.labels)
        xx, tt, ll = self._both(x, t)
        return self._mix(self.model(xx, tt, labels=ll))

    def eps_and_head(self, x: torch.Tensor, t):
        if not self.guided:
            return self.model.eps_and_head(x, t, labels=self.labels)
        xx, tt, ll = self._both(x, t)
        eps, head = self.model.eps_and_head(xx, tt, labels=ll)
        return self._mix(eps), self._mix(head)


def conditioned(model, labels, guidance_scale, batch: int, device=None):
    """The eps model ``sample()`` / ``encode()`` run: ``model`` itself when labels is None (a
    conditional network then runs its null class), else a :class:`Conditioned` wrapper.

    guidance_scale None means DEFAULT_GUIDANCE_SCALE when labels are given."""
    if labels is None:
        if guidance_scale is not None and float(guidance_scale) != 1.0:
            raise ValueError(f"guidance_scale={guidance_scale} needs labels (guidance mixes the conditional "
                             f"and unconditional predictions); pass labels=")
        return model
    scale = check_scale(guidance_scale)
    labels = check_labels(labels, batch, _num_classes(model), device)
    return Conditioned(model, labels, scale)


def check_scale(guidance_scale) -> float:
    """The guidance scale as a float (None: DEFAULT_GUIDANCE_SCALE); a finite number >= 0."""
    if guidance_scale is None:
        return DEFAULT_GUIDANCE_SCALE
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
            or not math.isfinite(float(guidance_scale)) or float(guidance_scale) < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
    return float(guidance_scale)
