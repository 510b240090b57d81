"""The model on the engine's device, per network dtype (`ModelWeights`), and kept current.

    - an ``nn.Module`` whose floating-point parameters and buffers already all live on the device in
      ``net_dtype`` is used as is. The engine then reads its tensors live: in-place changes
      (optimizer steps, ``load_state_dict``, buffers a wrapper updates between calls) reach the
      next eager run and the next graph replay. Its weights-changed test is O(1): the storage of
      its first floating-point tensor (``model.half()``, ``.to()`` or ``load_state_dict(assign=True)``
      replace every tensor, and a replaced storage would leave a graph reading freed memory): on a
      change every graph and copy is dropped and made again.
    - any other module is copied to the device once per ``net_dtype`` (`converted_copy`: floating
      parameters and buffers converted, integer buffers kept), in the model's own train/eval mode.
      Before every call the version counters of the model's parameters and buffers are compared
      with those at the last copy (one attribute read per tensor: about 20 us for the bundled
      model's 182 tensors, 50-75 us for the 920 of the DDPM++ deep U-Net on this project's CPU) and
      changed tensors are copied into the engine's copies in place (same addresses: graphs stay
      valid). So a model whose buffers are updated in place between calls (e.g. a guidance wrapper's
      labels and scale) replays the same graph with the new values. After replacing parameter
      objects (``load_state_dict(assign=True)`` on a copied model), call the engine's `refresh()`.
"""
from __future__ import annotations

import copy
import operator

import torch
from torch import nn

__all__ = ["ModelWeights", "converted_copy"]

_VERSION = operator.attrgetter("_version")


def converted_copy(model: nn.Module, device, dtype) -> nn.Module:
    """deepcopy of `model` converted as ``model.to(device, dtype)`` converts it, through the modules'
    own ``_apply`` (a module that keeps a table in float64 through ``.half()``, e.g.
    `genie_fast.models.diffusers.DiffusersUNet`, keeps it here too), tensor by tensor (no
    full-precision intermediate copy on the device), without gradients, in the model's mode. The
    model itself is left untouched: the copy starts from aliases of its tensors, each replaced by
    its converted copy."""
    memo = {}
    with torch.inference_mode(False), torch.no_grad():
        for p in model.parameters():
            if id(p) not in memo:
                memo[id(p)] = nn.Parameter(p.detach(), requires_grad=False)  # an alias, converted below
        for b in model.buffers():
            if id(b) not in memo:
                memo[id(b)] = b.detach()
        net = copy.deepcopy(model, memo)
        net._apply(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, copy=True))
        return net


class ModelWeights:
    """A module as it runs on `device` in each network dtype asked for (module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.clear()

    def clear(self):
        """Forget every copy and as-is model."""
        self.nets: dict[torch.dtype, nn.Module] = {}   # net_dtype -> the model as the engine runs it
        self.as_is: dict[torch.dtype, tuple] = {}      # net_dtype -> (probe tensor, its data_ptr) of an as-is model
        self.copies: dict[torch.dtype, list] = {}      # net_dtype -> a copy's tensors, aligned with sources
        self.sources = None                            # the model's parameters and buffers (copies only)
        self.versions = None                           # their version counters at the last copy

    def get(self, model: nn.Module, net_dtype: torch.dtype) -> nn.Module:
        net = self.nets.get(net_dtype)
        if net is None:
            with torch.inference_mode(False), torch.no_grad():
                net = self.nets[net_dtype] = self._place(model, net_dtype)
        return net

    def _place(self, model: nn.Module, net_dtype):
        tensors = [*model.parameters(), *model.buffers()]
        floating = [t for t in tensors if t.is_floating_point()]
        if all(t.device == self.device and t.dtype == net_dtype for t in floating):
            if floating:
                self.as_is[net_dtype] = (floating[0], floating[0].data_ptr())
            return model
        if self.sources is None:
            self.sources = tensors
            self.versions = list(map(_VERSION, tensors))
        net = converted_copy(model, self.device, net_dtype)
        copied = [*net.parameters(), *net.buffers()]
        if len(copied) != len(self.sources):
            raise RuntimeError("copying the model changed its set of parameters and buffers")
        self.copies[net_dtype] = copied
        return net

    def sync(self) -> str | None:
        """Before every call: "replaced" if an as-is model's tensors were replaced (drop everything:
        the caller refreshes), "copied" if changed tensors were copied into the copies, else None."""
        for dtype, (probe, ptr) in self.as_is.items():
            if probe.data_ptr() != ptr or probe.dtype != dtype or probe.device != self.device:
                return "replaced"
        if self.sources is None:
            return None
        versions = list(map(_VERSION, self.sources))
        if versions == self.versions:
            return None
        with torch.inference_mode(False), torch.no_grad():
            for copied in self.copies.values():
                for dst, src, v, v_old in zip(copied, self.sources, versions, self.versions):
                    if v != v_old:
                        dst.copy_(src)
        self.versions = versions
        return "copied"
