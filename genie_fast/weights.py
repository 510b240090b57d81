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
    - on the CPU the float32 and bf16 copies are channels-last (4-D weights in NHWC order: oneDNN's
      convolutions then skip a reorder per call; bench/RESULTS.md "CPU path"); float64 copies
      (accuracy work) keep the model's layout and its exact results. ``channels_last=True`` makes a
      channels-last copy even of a module that could run as is (it then follows the copy rules), of
      any dtype; False never.
    - ``compile=True`` (CPU): the network as the engine runs it is wrapped in `CompiledNet`
      (``torch.compile``, inductor), compiled on its first call per input shape and kept with the
      copy (so within the process); JVPs (genie_exact) run the eager module.
"""
from __future__ import annotations

import copy
import functools
import operator
import time

import torch
from torch import nn

__all__ = ["ModelWeights", "CompiledNet", "converted_copy"]

_VERSION = operator.attrgetter("_version")


def converted_copy(model: nn.Module, device, dtype, channels_last: bool = False) -> nn.Module:
    """deepcopy of `model` converted as ``model.to(device, dtype)`` converts it, through the modules'
    own ``_apply`` (a module that keeps a table in float64 through ``.half()``, e.g.
    `genie_fast.models.diffusers.DiffusersUNet`, keeps it here too), tensor by tensor (no
    full-precision intermediate copy on the device), without gradients, in the model's mode. The
    model itself is left untouched: the copy starts from aliases of its tensors, each replaced by
    its converted copy. channels_last: 4-D floating tensors in channels-last memory order."""
    memo = {}
    with torch.inference_mode(False), torch.no_grad():
        for p in model.parameters():
            if id(p) not in memo:
                memo[id(p)] = nn.Parameter(p.detach(), requires_grad=False)  # an alias, converted below
        for b in model.buffers():
            if id(b) not in memo:
                memo[id(b)] = b.detach()
        net = copy.deepcopy(model, memo)
        def convert(t):
            fmt = torch.channels_last if channels_last and t.dim() == 4 and t.is_floating_point() else \
                torch.preserve_format
            return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, copy=True, memory_format=fmt)
        net._apply(convert)
        return net


class CompiledNet(nn.Module):
    """`net` with ``forward`` (and ``eps_and_head`` where it has one) compiled by ``torch.compile``
    (inductor; shapes static, so one compile per batch shape) on first use; every other attribute is
    the net's. ``compile_s``: seconds spent in first calls (compiles) so far; ``compiles``: how many.
    A call with forward-mode dual tensors or autograd on (genie_exact's JVP, training) runs the eager
    net. ``head`` reads None: the engine's NVTX hooks on a head would change the compiled module's
    hooks at every call and force recompiles."""

    head = None

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self._compiled: dict = {}
        self._seen: set = set()
        self.compile_s, self.compiles = 0.0, 0

    def _call(self, name: str, x, *args, **kw):
        import torch.autograd.forward_ad as fwAD

        eager = getattr(self.net, name)
        if torch.is_grad_enabled() or fwAD.unpack_dual(x).tangent is not None:
            return eager(x, *args, **kw)
        fn = self._compiled.get(name)
        if fn is None:
            fn = self._compiled[name] = torch.compile(eager, dynamic=False)
        sig = (name, tuple(x.shape), x.dtype, x.device)
        if sig in self._seen:
            return fn(x, *args, **kw)
        t0 = time.perf_counter()
        out = fn(x, *args, **kw)
        self.compile_s += time.perf_counter() - t0
        self.compiles += 1
        self._seen.add(sig)
        return out

    def forward(self, x, *args, **kw):
        return self._call("forward", x, *args, **kw)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules (self.net)
        except AttributeError:
            pass
        net = self._modules["net"]
        if name == "eps_and_head" and callable(getattr(net, name, None)):
            return functools.partial(self._call, name)
        return getattr(net, name)


class ModelWeights:
    """A module as it runs on `device` in each network dtype asked for (module docstring)."""

    def __init__(self, device: torch.device, channels_last: bool | None = None, compile: bool = False):
        self.device = device
        self.channels_last = channels_last  # None: the CPU's copies; True: a copy on the CPU always; False: never
        self.compile = compile
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
                net = self._place(model, net_dtype)
                self.nets[net_dtype] = net = CompiledNet(net) if self.compile else net
        return net

    def compile_seconds(self) -> tuple[float, int]:
        """(seconds, count) of the compiles of the compiled nets so far."""
        nets = [n for n in self.nets.values() if isinstance(n, CompiledNet)]
        return sum(n.compile_s for n in nets), sum(n.compiles for n in nets)

    def _place(self, model: nn.Module, net_dtype):
        tensors = [*model.parameters(), *model.buffers()]
        floating = [t for t in tensors if t.is_floating_point()]
        cpu = self.device.type == "cpu" and (self.channels_last or (
            self.channels_last is None and net_dtype in (torch.float32, torch.bfloat16)))
        if all(t.device == self.device and t.dtype == net_dtype for t in floating) and not (
                cpu and self.channels_last and any(t.dim() == 4 for t in floating)):
            if floating:
                self.as_is[net_dtype] = (floating[0], floating[0].data_ptr())
            return model
        if self.sources is None:
            self.sources = tensors
            self.versions = list(map(_VERSION, tensors))
        net = converted_copy(model, self.device, net_dtype, channels_last=cpu)
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
