"""Conditioning inputs and classifier-free guidance as one eps model the solvers call like any other.

A network with conditioning inputs (``model(x, t, **inputs)``: class labels, ``model.num_classes
= K > 0`` with K the null class, "no label"; text embeddings; any named batch-first tensors,
`genie_fast.conditioning`) is wrapped in :class:`Conditioned`, which the solvers and the
CUDA-graph engine see as a plain eps model ``eps(x, t)`` with ``eps_and_head(x, t)`` when the
network has a GENIE head.

Guidance (Ho & Salimans 2022), in the diffusers convention for the scale s:

    eps = eps_u + s (eps_c - eps_u)        (s = 1: conditional only; s = 0: unconditional)

GENIE's paper writes the same with w = s - 1. The two branches run as ONE batched network call on
2B inputs (conditional inputs, then the negative ones: the null label, ``negative_cond``), so a
guided step costs two network
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

The inputs and the scale live in buffers of the wrapper. :meth:`Conditioned.update` copies new
values into them in place, so a captured CUDA graph that reads them replays with the new values
without a new capture (the structure, guided or not, the names and shapes, is fixed at
construction). `wrapper_for` keeps one wrapper per (model, batch, signature, thread) for
``sample()``, ``encode()`` and the engine.
"""
from __future__ import annotations

import collections
import math
import threading

import torch
from torch import nn

from .conditioning import check_cond, check_cond_names, cond_signature, null_cond
from .devices import model_device

__all__ = ["Conditioned", "conditioned", "wrapper_for", "check_labels", "check_scale", "DEFAULT_GUIDANCE_SCALE"]

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
    """An eps model with fixed conditioning inputs and (optionally) classifier-free guidance.

    model: a network called as ``model(x, t, **inputs)`` (and ``model.eps_and_head(x, t, **inputs)``
    for GENIE). labels: LongTensor (B,) in 0..num_classes for a class-conditional model (one input,
    ``labels``); cond: a checked mapping (`conditioning.check_cond`) of further inputs (B, ...).
    guidance_scale: the diffusers-convention scale s; ``None`` or 1 means conditional only.
    negative_cond: the inputs of the negative (unconditional) branch, by name; a name it does not
    give takes the model's null input (`conditioning.null_cond`: the null label, a declared
    ``null_cond``), else the conditional value (shared by both branches, e.g. SDXL's time ids). At
    least one input must differ between the branches.
    """

    def __init__(self, model, labels: torch.Tensor | None = None, guidance_scale: float | None = None, *,
                 cond: dict | None = None, negative_cond: dict | None = None):
        super().__init__()
        self.model = model
        inputs = self._inputs(labels, cond)
        if not inputs:
            raise ValueError("the model is not class-conditional (num_classes = 0) and no cond= was given: labels "
                             "and guidance need a conditioning input")
        self.num_classes = _num_classes(model)
        if "labels" in inputs and self.num_classes <= 0:
            raise ValueError("the model is not class-conditional (num_classes = 0): labels and guidance need one")
        self.guided = guidance_scale is not None and float(guidance_scale) != 1.0
        self.evals_per_call = 2 if self.guided else 1
        # the scale as a number on the host: the key of a tuned grid (`grid_store`), never read on the device
        self.guidance_value = 1.0 if guidance_scale is None else float(guidance_scale)
        self._names = tuple(sorted(inputs))
        self._batch = next(iter(inputs.values())).shape[0]
        negatives, self._shared = self._negatives(inputs, negative_cond)
        device = next(iter(inputs.values())).device
        for k, v in inputs.items():
            self.register_buffer(_pos_name(k), v.clone(), persistent=False)
            if self.guided and k not in self._shared:
                self.register_buffer(_neg_name(k), negatives[k].clone(), persistent=False)
        self.register_buffer("scale", torch.tensor(1.0 if guidance_scale is None else float(guidance_scale),
                                                   dtype=torch.float32, device=device), persistent=False)
        self.schedule = getattr(model, "schedule", None)
        self.image_shape = getattr(model, "image_shape", None)
        if hasattr(model, "head_error"):  # genie_multistep's trust in the head (the mix is no exact head)
            self.head_error = model.head_error
        if not callable(getattr(model, "eps_and_head", None)):
            self.eps_and_head = None  # genie then asks for head= or refuses, as for any eps model

    @staticmethod
    def _inputs(labels, cond) -> dict:
        inputs = dict(cond or {})
        if labels is not None:
            if "labels" in inputs:
                raise ValueError("labels were given twice: as labels= and as cond['labels']")
            inputs["labels"] = labels
        if "labels" in inputs:
            inputs["labels"] = inputs["labels"].to(torch.long)
        sizes = {v.shape[0] for v in inputs.values()}
        if len(sizes) > 1:
            raise ValueError(f"the conditioning inputs disagree on the batch: {sorted(sizes)} rows")
        return inputs

    def _negatives(self, inputs: dict, negative_cond) -> tuple[dict, frozenset]:
        """(the negative branch's inputs, the names shared with the conditional branch)."""
        given = dict(negative_cond or {})
        for k, v in given.items():
            if k not in inputs:
                raise ValueError(f"negative_cond[{k!r}] has no conditional counterpart: cond has {sorted(inputs)}")
            if v.shape != inputs[k].shape or v.dtype != inputs[k].dtype:
                raise ValueError(f"negative_cond[{k!r}] is {tuple(v.shape)} {v.dtype}; the conditional input is "
                                 f"{tuple(inputs[k].shape)} {inputs[k].dtype} (both branches run as one batch)")
        if not self.guided:
            return {}, frozenset(inputs)
        nulls = null_cond(self.model, self._batch, next(iter(inputs.values())).device)
        out = {}
        for k, v in inputs.items():
            neg = given.get(k, nulls.get(k))
            if neg is not None and (neg.shape != v.shape or neg.dtype != v.dtype):
                raise ValueError(f"{type(self.model).__name__}.null_cond[{k!r}] is {tuple(neg.shape)} {neg.dtype}; "
                                 f"cond[{k!r}] is {tuple(v.shape)} {v.dtype}: pass negative_cond[{k!r}]")
            if neg is not None:
                out[k] = neg.to(v.device)
        if not out:
            raise ValueError(f"guidance needs a negative branch: pass negative_cond= (the model has no null input "
                             f"for {sorted(inputs)}), or guidance_scale=1")
        return out, frozenset(k for k in inputs if k not in out)

    @property
    def cond(self) -> dict:
        """The conditional branch's inputs (the buffers, by name)."""
        return {k: getattr(self, _pos_name(k)) for k in self._names}

    @property
    def negative_cond(self) -> dict:
        """The negative branch's inputs (shared names: the conditional buffers)."""
        return {k: getattr(self, _pos_name(k) if k in self._shared else _neg_name(k)) for k in self._names}

    def signature(self) -> tuple:
        return cond_signature(self.cond)

    def update(self, labels: torch.Tensor | None = None, guidance_scale: float | None = None, *,
               cond: dict | None = None, negative_cond: dict | None = None):
        """Copy new inputs / scale into the buffers in place (a captured graph sees them); the names,
        shapes and the guided structure must stay as at construction."""
        inputs = self._inputs(labels, cond)
        if tuple(sorted(inputs)) != self._names:
            raise ValueError(f"update got the inputs {sorted(inputs)}, this wrapper holds {list(self._names)}")
        for k, v in inputs.items():
            held = getattr(self, _pos_name(k)).shape
            if v.shape != held:
                name = "labels" if k == "labels" else f"cond[{k!r}]"
                raise ValueError(f"{name} shape {tuple(v.shape)} differs from {tuple(held)}")
        guided = guidance_scale is not None and float(guidance_scale) != 1.0
        if guided != self.guided:
            raise ValueError("update cannot switch between guided and unguided sampling; make a new Conditioned")
        negatives, shared = self._negatives(inputs, negative_cond)
        if guided and shared != self._shared:
            raise ValueError("update changes which inputs the two branches share; make a new Conditioned")
        for k, v in inputs.items():
            getattr(self, _pos_name(k)).copy_(v)
            if k in negatives:
                getattr(self, _neg_name(k)).copy_(negatives[k])
        self.guidance_value = 1.0 if guidance_scale is None else float(guidance_scale)
        self.scale.fill_(self.guidance_value)

    def _kwargs(self) -> dict:
        """The model's keyword inputs of one call: [conditional | negative] halves when guided."""
        if not self.guided:
            return {k: getattr(self, _pos_name(k)) for k in self._names}
        out = {}
        for k in self._names:
            pos = getattr(self, _pos_name(k))
            out[k] = torch.cat([pos, pos if k in self._shared else getattr(self, _neg_name(k))])
        return out

    def _both(self, x, t):
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        return torch.cat([x, x]), torch.cat([t, t])

    def _mix(self, both: torch.Tensor) -> torch.Tensor:
        cond, uncond = both.chunk(2)
        s = self.scale.to(both.dtype)
        return uncond + s * (cond - uncond)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        if not self.guided:
            return self.model(x, t, **self._kwargs())
        xx, tt = self._both(x, t)
        return self._mix(self.model(xx, tt, **self._kwargs()))

    def eps_and_head(self, x: torch.Tensor, t):
        if not self.guided:
            return self.model.eps_and_head(x, t, **self._kwargs())
        xx, tt = self._both(x, t)
        eps, head = self.model.eps_and_head(xx, tt, **self._kwargs())
        return self._mix(eps), self._mix(head)


def _pos_name(k: str) -> str:
    return "labels" if k == "labels" else f"cond_{k}"


def _neg_name(k: str) -> str:
    return "null" if k == "labels" else f"negative_{k}"


def conditioned(model, labels, guidance_scale, batch: int, device=None, cond=None, negative_cond=None):
    """The eps model ``sample()`` / ``encode()`` run: ``model`` itself without labels and cond (a
    conditional network then runs its null input), else a new :class:`Conditioned` wrapper.

    Every argument is checked first, by name. guidance_scale None means DEFAULT_GUIDANCE_SCALE
    where the run has a negative branch (labels, negative_cond, or a model with a null input for one
    of the cond names), else 1 (the conditional model alone)."""
    checked = _checked(model, labels, guidance_scale, batch, device, cond, negative_cond)
    if checked is None:
        return model
    inputs, negatives, scale = checked
    return Conditioned(model, guidance_scale=scale, cond=inputs, negative_cond=negatives)


def _checked(model, labels, guidance_scale, batch, device, cond, negative_cond):
    """(inputs, negative inputs, scale) of a conditioned run, checked; None without conditioning."""
    if labels is None and cond is None:
        if negative_cond is not None:
            raise ValueError("negative_cond= needs cond= (or labels=): it is the other branch of guidance")
        if guidance_scale is not None and float(check_scale(guidance_scale)) != 1.0:
            raise ValueError(f"guidance_scale={guidance_scale} needs labels or cond (guidance mixes the conditional "
                             f"and unconditional predictions); pass labels= or cond=")
        return None
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"labels / cond need a positive integer batch: give noise= or n=, got n={batch!r}")
    if guidance_scale is not None:
        check_scale(guidance_scale)
    inputs = check_cond(cond, batch, "cond", device)
    negatives = check_cond(negative_cond, batch, "negative_cond", device)
    check_cond_names(model, inputs, "cond")
    check_cond_names(model, negatives, "negative_cond")
    k = _num_classes(model)
    if labels is not None:
        if "labels" in inputs:
            raise ValueError("labels were given twice: as labels= and as cond['labels']")
        inputs["labels"] = check_labels(labels, batch, k, device)
    elif "labels" in inputs:
        inputs["labels"] = check_labels(inputs["labels"], batch, k, device)
    if "labels" in negatives:
        negatives["labels"] = check_labels(negatives["labels"], batch, k, device)
    if guidance_scale is None:
        nulls = set(getattr(model, "null_cond", None) or ()) | ({"labels"} if k else set())
        has_negative = bool(negatives) or bool(nulls & set(inputs))
        guidance_scale = DEFAULT_GUIDANCE_SCALE if has_negative else 1.0
    return inputs, negatives, float(guidance_scale)


# The Conditioned wrappers of recent (model, batch, guided, inputs, device, thread) combinations. The
# engine caches graphs per model object, so a wrapper is reused across calls and only its buffers
# (inputs, scale) change (in place): new values of the same shapes replay the captured graph. A
# wrapper belongs to one thread (its buffers hold one call's inputs from the update to the end of
# the run), so threads sampling the same model never see each other's. Bounded: it keeps at most
# this many models alive.
_WRAPPERS: "collections.OrderedDict[tuple, Conditioned]" = collections.OrderedDict()
_MAX_WRAPPERS = 8
_LOCK = threading.Lock()


def wrapper_for(model, batch, labels=None, guidance_scale=None, cond=None, negative_cond=None):
    """`model` itself without labels and cond, else its cached Conditioned wrapper for this thread,
    batch and input signature, holding the call's inputs and scale (arguments checked, by name)."""
    if labels is None and cond is None and negative_cond is None and guidance_scale is None:
        return model  # the unconditioned path: nothing to check, nothing to build
    checked = _checked(model, labels, guidance_scale, batch, model_device(model), cond, negative_cond)
    if checked is None:
        return model
    inputs, negatives, scale = checked
    key = (id(model), batch, scale != 1.0, cond_signature(inputs), tuple(sorted(negatives)), threading.get_ident())
    with _LOCK:
        cached = _WRAPPERS.get(key)
        if cached is None or cached.model is not model:
            cached = _WRAPPERS[key] = Conditioned(model, guidance_scale=scale, cond=inputs, negative_cond=negatives)
            if len(_WRAPPERS) > _MAX_WRAPPERS:
                _WRAPPERS.popitem(last=False)
            return cached
        _WRAPPERS.move_to_end(key)
    cached.update(guidance_scale=scale, cond=inputs, negative_cond=negatives)
    return cached


def check_scale(guidance_scale) -> float:
    """The guidance scale as a float (None: DEFAULT_GUIDANCE_SCALE); a finite number >= 0."""
    if guidance_scale is None:
        return DEFAULT_GUIDANCE_SCALE
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
            or not math.isfinite(float(guidance_scale)) or float(guidance_scale) < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
    return float(guidance_scale)
