"""DDPM++-style U-Net score network (eps prediction) for continuous VP time.

Follows the shape of the ScoreSDE DDPM++ network (Song et al. 2021) that GENIE distils from:
positional time embedding (of ``999 * t`` as ScoreSDE, or of log gamma_t) -> MLP, residual blocks with GroupNorm + SiLU and a
time-embedding bias, skip connections rescaled by 1/sqrt(2), self-attention at chosen
resolutions, and a GroupNorm -> SiLU -> conv3x3 output. ``forward(x, t, return_features=True)``
also returns what the GENIE head needs: the last feature map before the output norm and the time
embedding.

Named configs (``CONFIGS``):

* ``ddpmpp_deep_cifar10``: nf 128, ch_mult (1, 2, 2, 2), 8 blocks per level, attention at 16,
  3x32x32, the ScoreSDE "DDPM++ deep cont." CIFAR-10 shape. 104,570,627 parameters
  (dropout 0.1 as in ScoreSDE; used with random weights for GPU timings).
* ``fmnist_small``: Fashion-MNIST, 1x32x32, ScoreSDE time input ``999 * t`` (the first bundled model).
* ``fmnist_small_lg``: the same network with the smooth ``log_gamma`` time input: the shipped default.
* ``fmnist_cond``: ``fmnist_small_lg`` with 10 classes and a null class: the shipped default.
* ``tiny``, ``tiny_cond``: for tests.

Class conditioning (``UNetConfig.num_classes = K > 0``): a learned embedding of the label in
``0 .. K`` (``K`` is the null class, "no label") is added to the time embedding after its MLP, so
every residual block and the GENIE head (which reads the time embedding) see it. The embedding
starts at zero: a conditional network initialised from an unconditional one computes the same
function until training moves it. ``labels=None`` means the null class for every sample.

Time input (``UNetConfig.time_input``):

* ``"999t"``: sinusoidal embedding of ``999 * t`` (ScoreSDE). Its fastest feature has a period of
  2 pi / 999 = 0.0063 in t; a network that has not learned to cancel it is wavy in t at that scale,
  so its exact d eps/dt (what GENIE's Taylor step and head distillation use) says little about how
  eps changes over a solver step (``bench/diag_time_roughness.py`` measures this).
* ``"log_gamma"``: sinusoidal embedding of log gamma_t (gamma = sigma / alpha of the default linear
  VP schedule), frequencies 1 down to 1/100 per unit of log gamma: the log-SNR axis the solvers
  step along, with no feature faster than a period of 2 pi there.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
import torch.nn.functional as F

from ..checks import check_int
from ..schedule import VPSchedule

TIME_INPUTS = ("999t", "log_gamma")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of a :class:`UNet`. All fields are JSON-serialisable."""

    in_channels: int = 1
    image_size: int = 32
    nf: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = (8,)
    dropout: float = 0.0
    time_input: str = "999t"
    num_classes: int = 0

    def __post_init__(self):
        if self.time_input not in TIME_INPUTS:
            raise ValueError(f"unknown time_input {self.time_input!r}; known: {sorted(TIME_INPUTS)}")
        if not isinstance(self.num_classes, int) or isinstance(self.num_classes, bool) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0: unconditional), got {self.num_classes!r}")
        for name, least in (("in_channels", 1), ("image_size", 1), ("nf", 1), ("num_res_blocks", 0)):
            check_int(f"UNetConfig.{name}", getattr(self, name), least)
        if not isinstance(self.ch_mult, tuple) or not self.ch_mult:
            raise ValueError(f"UNetConfig.ch_mult must be a non-empty tuple of ints >= 1, got {self.ch_mult!r}")
        for m in self.ch_mult:
            check_int("UNetConfig.ch_mult", m, 1)
        for r in self.attn_resolutions:
            check_int("UNetConfig.attn_resolutions", r, 1)
        # every down-sampling halves the image and the decoder doubles it back: it must divide exactly
        levels = 2 ** (len(self.ch_mult) - 1)
        if self.image_size % levels:
            raise ValueError(f"UNetConfig.image_size {self.image_size} must be a multiple of {levels} "
                             f"(2 ** (len(ch_mult) - 1), ch_mult {self.ch_mult})")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"UNetConfig.dropout must be a number in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a UNetConfig is a JSON object of its fields, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown UNetConfig fields: {sorted(unknown)}")
        d = dict(d)
        for k in ("ch_mult", "attn_resolutions"):
            if k in d:
                if not isinstance(d[k], (list, tuple)):
                    raise ValueError(f"UNetConfig.{k} must be a list of ints, got {d[k]!r}")
                d[k] = tuple(d[k])
        return cls(**d)


CONFIGS: dict[str, UNetConfig] = {
    "ddpmpp_deep_cifar10": UNetConfig(in_channels=3, image_size=32, nf=128, ch_mult=(1, 2, 2, 2),
                                      num_res_blocks=8, attn_resolutions=(16,), dropout=0.1),
    "fmnist_small": UNetConfig(in_channels=1, image_size=32, nf=32, ch_mult=(1, 2, 2),
                               num_res_blocks=1, attn_resolutions=(8,), dropout=0.0),
    "fmnist_small_lg": UNetConfig(in_channels=1, image_size=32, nf=32, ch_mult=(1, 2, 2),
                                  num_res_blocks=1, attn_resolutions=(8,), dropout=0.0,
                                  time_input="log_gamma"),
    "fmnist_cond": UNetConfig(in_channels=1, image_size=32, nf=32, ch_mult=(1, 2, 2),
                              num_res_blocks=1, attn_resolutions=(8,), dropout=0.0,
                              time_input="log_gamma", num_classes=10),
    "tiny": UNetConfig(in_channels=1, image_size=8, nf=8, ch_mult=(1, 2), num_res_blocks=1,
                       attn_resolutions=(4,), dropout=0.0),
    "tiny_cond": UNetConfig(in_channels=1, image_size=8, nf=8, ch_mult=(1, 2), num_res_blocks=1,
                            attn_resolutions=(4,), dropout=0.0, num_classes=10),
}


def _groups(ch: int) -> int:
    # 32 groups as in DDPM++, fewer for narrow layers so each group keeps >= 4 channels.
    g = min(32, max(1, ch // 4))
    while ch % g:
        g -= 1
    return g


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, scale: float = 999.0) -> torch.Tensor:
    """Sinusoidal embedding of ``scale * t`` (ScoreSDE: 999 t), frequencies 1 .. 1/max_period.

    t: (B,) -> (B, dim)."""
    half = dim // 2
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32  # fp16 times lose too much
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = (scale * t.to(dtype))[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


_VP = VPSchedule()  # the default linear VP schedule (beta_min 0.1, beta_d 19.9) the networks train with


def log_gamma_vp(t: torch.Tensor) -> torch.Tensor:
    """log(sigma_t / alpha_t) = -log_snr(t) / 2 of the default VP schedule, in float32 or float64."""
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    return -0.5 * _VP.log_snr(t.to(dtype))


def time_embedding(t: torch.Tensor, dim: int, time_input: str) -> torch.Tensor:
    """The U-Net's time features for ``UNetConfig.time_input``."""
    if time_input == "999t":
        return timestep_embedding(t, dim)
    return timestep_embedding(log_gamma_vp(t), dim, max_period=100.0, scale=1.0)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float):
        super().__init__()
        self.norm0 = nn.GroupNorm(_groups(in_ch), in_ch, eps=1e-6)
        self.conv0 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.dense = nn.Linear(temb_dim, out_ch)
        self.norm1 = nn.GroupNorm(_groups(out_ch), out_ch, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv1.weight)  # each block starts as the identity (DDPM++ init_scale=0)
        nn.init.zeros_(self.conv1.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        h = h + self.dense(F.silu(temb))[:, :, None, None]
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))
        return (self.skip(x) + h) / math.sqrt(2.0)


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions (DDPM++), residual, rescaled by 1/sqrt(2).

    ``scaled_dot_product_attention`` gets 4-D ``(B, heads=1, L=H*W, D=C)`` inputs with a unit
    last-dim stride: the layout the fused CUDA kernels (flash, memory-efficient) accept; 3-D
    inputs send fp16 to the math path (fp32 upcast, the whole L x L matrix). On the CPU the
    same 4-D call selects a flash kernel without forward-mode AD, so JVPs through this block run
    under ``genie_fast.solvers.jvp`` (math attention; see there).
    """

    def __init__(self, ch: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(ch), ch, eps=1e-6)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        # (B, 3C, H, W) -> (B, HW, 3C) contiguous -> q, k, v of shape (B, 1, HW, C)
        qkv = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).contiguous()
        q, k, v = qkv.view(B, 1, H * W, 3, C).unbind(3)
        h = F.scaled_dot_product_attention(q, k, v)                     # (B, 1, HW, C)
        h = self.proj(h.view(B, H * W, C).transpose(1, 2).reshape(B, C, H, W))
        return (x + h) / math.sqrt(2.0)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """eps_theta(x, t): x (B, C, H, W), t (B,) continuous VP time in [1e-3, 1] -> eps (B, C, H, W)."""

    def __init__(self, config: UNetConfig | str = "fmnist_small"):
        super().__init__()
        if isinstance(config, str):
            if config not in CONFIGS:
                raise ValueError(f"unknown UNet config {config!r}; known: {sorted(CONFIGS)}")
            config = CONFIGS[config]
        self.config = config
        c = config
        nf = c.nf
        self.temb_dim = 4 * nf
        self.feature_channels = nf
        self.temb = nn.Sequential(nn.Linear(nf, self.temb_dim), nn.SiLU(), nn.Linear(self.temb_dim, self.temb_dim))
        self.label_emb = None
        if c.num_classes:
            self.label_emb = nn.Embedding(c.num_classes + 1, self.temb_dim)  # row num_classes: the null class
            nn.init.zeros_(self.label_emb.weight)
        self.conv_in = nn.Conv2d(c.in_channels, nf, 3, padding=1)

        # Encoder: record the channel count of every tensor pushed on the skip stack.
        self.down = nn.ModuleList()
        skip_ch = [nf]
        ch, res = nf, c.image_size
        for level, mult in enumerate(c.ch_mult):
            for _ in range(c.num_res_blocks):
                blocks = nn.ModuleList([ResBlock(ch, nf * mult, self.temb_dim, c.dropout)])
                ch = nf * mult
                if res in c.attn_resolutions:
                    blocks.append(AttnBlock(ch))
                self.down.append(blocks)
                skip_ch.append(ch)
            if level != len(c.ch_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(ch)]))
                res //= 2
                skip_ch.append(ch)

        self.mid = nn.ModuleList([ResBlock(ch, ch, self.temb_dim, c.dropout), AttnBlock(ch),
                                  ResBlock(ch, ch, self.temb_dim, c.dropout)])

        # Decoder: num_res_blocks + 1 blocks per level, each consuming one skip.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.ch_mult))):
            for _ in range(c.num_res_blocks + 1):
                blocks = nn.ModuleList([ResBlock(ch + skip_ch.pop(), nf * mult, self.temb_dim, c.dropout)])
                ch = nf * mult
                if res in c.attn_resolutions:
                    blocks.append(AttnBlock(ch))
                self.up.append(blocks)
            if level != 0:
                self.up.append(nn.ModuleList([Upsample(ch)]))
                res *= 2
        assert not skip_ch and ch == nf

        self.norm_out = nn.GroupNorm(_groups(nf), nf, eps=1e-6)
        self.conv_out = nn.Conv2d(nf, c.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @staticmethod
    def _run(blocks: nn.ModuleList, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for b in blocks:
            h = b(h, temb) if isinstance(b, ResBlock) else b(h)
        return h

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, return_features: bool = False,
                labels: torch.Tensor | None = None):
        """Returns eps, or (eps, features (B, nf, H, W), temb (B, 4 nf)) with return_features.

        labels: (B,) int64 in 0 .. num_classes (num_classes = the null class), or None (all null);
        must be None for an unconditional network."""
        c, levels = self.config, 2 ** (len(self.config.ch_mult) - 1)
        if x.dim() != 4 or x.shape[1] != c.in_channels or x.shape[2] % levels or x.shape[3] % levels:
            raise ValueError(f"UNet input x must be (B, {c.in_channels}, H, W) with H and W multiples of {levels}, "
                             f"got shape {tuple(x.shape)}")
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        temb = self.temb(time_embedding(t, self.config.nf, self.config.time_input).to(x.dtype))
        if self.label_emb is not None:
            if labels is None:
                labels = torch.full((x.shape[0],), self.config.num_classes, dtype=torch.long, device=x.device)
            temb = temb + self.label_emb(labels).to(temb.dtype)
        elif labels is not None:
            raise ValueError("labels given to an unconditional U-Net (config num_classes = 0)")
        h = self.conv_in(x)
        skips = [h]
        for blocks in self.down:
            h = self._run(blocks, h, temb)
            skips.append(h)
        h = self._run(self.mid, h, temb)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(blocks, h, temb)
        features = h
        eps = self.conv_out(F.silu(self.norm_out(h)))
        if return_features:
            return eps, features, temb
        return eps


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
