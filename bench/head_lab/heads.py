"""Head candidates for the cached-target lab. Each maps a cache batch dict (x_t, eps, temb, f32, f16,
f8, mid: the U-Net's decoder features, see cache.py) to the raw (B, 3C, 32, 32) [h1 | h2 | h3].

* ``Shipped(width, blocks)``: the architecture of genie_fast.models.head.GenieHead (same parameter
  names, so the bundled head's state_dict loads): conv3x3(cat(x, eps, f32)) -> ResBlock(s) with temb
  -> GroupNorm -> SiLU -> conv3x3 to 3C (zero-init), everything at 32 px.
* ``MultiRes``: a small U-shaped decoder that starts at 8 px from cat(bottleneck, 8 px decoder
  output), ResBlocks conditioned on temb (optionally FiLM / scale-shift, optionally self-attention
  at 8 px), upsamples (nearest) to 16 px merging the 16 px decoder output by a 1x1 conv, and to
  32 px merging cat(up(h), f32) by a 1x1 conv and cat(x, eps) by a 3x3 conv, optional thin ResBlocks
  at 32 px, then GroupNorm -> SiLU -> conv3x3 to 3C (zero-init).
* ``KernelPredicting``: the shipped head plus a per-pixel adaptive filter. The target at small t is a
  Jacobian of the denoiser applied to a noise-like direction, and a denoiser's Jacobian acts as a
  local, image-adaptive filter; a stack of convolutions can only form such products of features and
  eps weakly. This head predicts, from its last hidden map (1x1 conv, zero-init), a K x K filter per
  pixel, per output channel and per filtered input (eps, x_t) and adds the filtered inputs to the
  shipped output: out = conv_out(h) + sum_{c,k} w_{o,c,k}(p) v_c(p + k).
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from genie_fast.models.unet import AttnBlock, ResBlock, _groups


class FiLMResBlock(nn.Module):
    """ResBlock whose second norm is modulated by (1 + scale, shift) from temb (AdaGN, as in ADM)."""

    def __init__(self, ch, temb_dim):
        super().__init__()
        self.norm0 = nn.GroupNorm(_groups(ch), ch, eps=1e-6)
        self.conv0 = nn.Conv2d(ch, ch, 3, padding=1)
        self.dense = nn.Linear(temb_dim, 2 * ch)
        self.norm1 = nn.GroupNorm(_groups(ch), ch, eps=1e-6)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)

    def forward(self, x, temb):
        h = self.conv0(F.silu(self.norm0(x)))
        scale, shift = self.dense(F.silu(temb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm1(h) * (1 + scale) + shift
        h = self.conv1(F.silu(h))
        return (x + h) / math.sqrt(2.0)


class Shipped(nn.Module):
    def __init__(self, width=32, blocks=1, C=1, feat=32, temb_dim=128):
        super().__init__()
        self.conv_in = nn.Conv2d(2 * C + feat, width, 3, padding=1)
        self.blocks = nn.ModuleList([ResBlock(width, width, temb_dim, 0.0) for _ in range(blocks)])
        self.norm_out = nn.GroupNorm(_groups(width), width, eps=1e-6)
        self.conv_out = nn.Conv2d(width, 3 * C, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def hidden(self, b):
        """The last hidden map, after GroupNorm and SiLU (what conv_out reads)."""
        h = self.conv_in(torch.cat([b["x_t"], b["eps"], b["f32"]], dim=1))
        for blk in self.blocks:
            h = blk(h, b["temb"])
        return F.silu(self.norm_out(h))

    def forward(self, b):
        return self.conv_out(self.hidden(b))


class KernelPredicting(Shipped):
    def __init__(self, width=32, blocks=1, k=5, C=1, **kw):
        super().__init__(width, blocks, C=C, **kw)
        self.k, self.c_in, self.c_out = k, 2 * C, 3 * C
        self.kernel = nn.Conv2d(width, self.c_out * self.c_in * k * k, 1)
        nn.init.zeros_(self.kernel.weight)
        nn.init.zeros_(self.kernel.bias)

    def forward(self, b):
        h = self.hidden(b)
        v = torch.cat([b["eps"], b["x_t"]], dim=1)
        B, _, H, W = v.shape
        patches = F.unfold(v, self.k, padding=self.k // 2).view(B, 1, self.c_in * self.k ** 2, H, W)
        w = self.kernel(h).view(B, self.c_out, self.c_in * self.k ** 2, H, W)
        return self.conv_out(h) + (w * patches).sum(2)


class MultiRes(nn.Module):
    def __init__(self, w8=32, n8=1, w16=32, n16=0, w32=32, n32=0, film=False, attn8=False, rich=False,
                 C=1, c32=32, c16=64, c8=64, cmid=64, temb_dim=128):
        super().__init__()
        # rich: the 32 px merge also reads the other 32 px activations of the U-Net (cache.EXTRA:
        # conv_in output, encoder 32 px block output, first 32 px decoder block output; 3 x 32 ch)
        self.needs_extra = rich
        if rich:
            c32 += 96
        blk = (lambda w: FiLMResBlock(w, temb_dim)) if film else (lambda w: ResBlock(w, w, temb_dim, 0.0))
        self.in8 = nn.Conv2d(cmid + c8, w8, 1)
        self.b8 = nn.ModuleList([blk(w8) for _ in range(n8)])
        self.attn8 = AttnBlock(w8) if attn8 else None
        self.in16 = nn.Conv2d(w8 + c16, w16, 1)
        self.b16 = nn.ModuleList([blk(w16) for _ in range(n16)])
        self.in32 = nn.Conv2d(w16 + c32, w32, 1)
        self.in32_img = nn.Conv2d(2 * C, w32, 3, padding=1)
        self.b32 = nn.ModuleList([blk(w32) for _ in range(n32)])
        self.norm_out = nn.GroupNorm(_groups(w32), w32, eps=1e-6)
        self.conv_out = nn.Conv2d(w32, 3 * C, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @staticmethod
    def _merge_up(conv, h, others):
        """conv1x1(cat(up2(h), *others)) without the concat: a 1x1 conv commutes with nearest
        up-sampling, so h's slice of the weight runs at the low resolution (same function, cheaper)."""
        w, c = conv.weight, h.shape[1]
        low = F.conv2d(h, w[:, :c])
        out = F.interpolate(low, scale_factor=2.0, mode="nearest") + conv.bias[None, :, None, None]
        for o in others:
            out = out + F.conv2d(o, w[:, c:c + o.shape[1]])
            c += o.shape[1]
        return out

    def forward(self, b):
        temb = b["temb"]
        h = self.in8(torch.cat([b["mid"], b["f8"]], dim=1))
        for i, blk in enumerate(self.b8):
            h = blk(h, temb)
            if i == 0 and self.attn8 is not None:
                h = self.attn8(h)
        h = self._merge_up(self.in16, h, [b["f16"]])
        for blk in self.b16:
            h = blk(h, temb)
        f32 = [b["f32"], b["e32a"], b["e32b"], b["e32c"]] if self.needs_extra else [b["f32"]]
        h = self._merge_up(self.in32, h, f32) + self.in32_img(torch.cat([b["x_t"], b["eps"]], dim=1))
        for blk in self.b32:
            h = blk(h, temb)
        return self.conv_out(F.silu(self.norm_out(h)))


CANDIDATES = {
    # name: (constructor, init-from-bundled)
    "shipped_init": (lambda: Shipped(32, 1), True),
    "shipped_scratch": (lambda: Shipped(32, 1), False),
    "shipped_w64": (lambda: Shipped(64, 1), False),
    "mr_s": (lambda: MultiRes(w8=32, n8=1, w16=32, n16=0, w32=32, n32=0), False),
    "mr_m": (lambda: MultiRes(w8=32, n8=1, w16=32, n16=1, w32=16, n32=0), False),
    "mr_l": (lambda: MultiRes(w8=32, n8=1, w16=24, n16=1, w32=16, n32=1, attn8=True), False),
    "mr_m_film": (lambda: MultiRes(w8=32, n8=1, w16=24, n16=1, w32=16, n32=0, film=True), False),
    "mr_w8": (lambda: MultiRes(w8=44, n8=1, w16=24, n16=0, w32=24, n32=0), False),
    # hybrids: low-res context (8/16 px) + one full-resolution ResBlock; the 32 px input is a 1x1 conv of
    # cat(up(h), f32) plus a 3x3 conv of cat(x, eps) instead of the shipped 3x3 conv of all 34 channels
    "hyb": (lambda: MultiRes(w8=24, n8=1, w16=24, n16=0, w32=32, n32=1), False),
    "hyb_film": (lambda: MultiRes(w8=24, n8=1, w16=24, n16=0, w32=32, n32=1, film=True), False),
    "hyb_rich": (lambda: MultiRes(w8=24, n8=1, w16=24, n16=0, w32=32, n32=1, rich=True), False),
    "mr_d8": (lambda: MultiRes(w8=32, n8=2, w16=24, n16=0, w32=24, n32=0), False),
    # the shipped head (initialised from the bundled one) + a per-pixel K x K filter of (eps, x_t)
    "kpn5_init": (lambda: KernelPredicting(32, 1, k=5), True),
    "kpn3_init": (lambda: KernelPredicting(32, 1, k=3), True),
    "kpn5_scratch": (lambda: KernelPredicting(32, 1, k=5), False),
}


def build(name):
    ctor, init = CANDIDATES[name]
    head = ctor()
    if init:
        from genie_fast.models import load_default
        missing, unexpected = head.load_state_dict(load_default().head.state_dict(), strict=False)
        if unexpected or any(not k.startswith("kernel.") for k in missing):
            raise RuntimeError(f"{name}: the bundled head does not fit: missing {missing}, unexpected {unexpected}")
    return head
