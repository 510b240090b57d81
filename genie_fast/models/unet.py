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
* ``fmnist16_cond``: the cascade's base model (issue 32): ``fmnist_cond``'s network on 1x16x16
  images (Fashion-MNIST average-pooled 2x2), attention at its lowest level (4x4) as ``fmnist_cond``
  has it at its (8x8): the same weights, so it can start from the bundled model's.
* ``fmnist_sr``: the cascade's super-resolution model 16x16 -> 32x32: ``fmnist_cond`` with a
  low-resolution input (``low_res_size`` 16), so it can start from the bundled model's weights.
* ``tiny``, ``tiny_cond``, ``tiny_low``, ``tiny_sr``: for tests.

Class conditioning (``UNetConfig.num_classes = K > 0``): a learned embedding of the label in
``0 .. K`` (``K`` is the null class, "no label") is added to the time embedding after its MLP, so
every residual block and the GENIE head (which reads the time embedding) see it. The embedding
starts at zero: a conditional network initialised from an unconditional one computes the same
function until training moves it. ``labels=None`` means the null class for every sample.

Low-resolution input (``UNetConfig.low_res_size = r > 0``, a super-resolution stage of a cascade,
Ho et al. 2021, "Cascaded Diffusion Models"): ``forward(..., low_res=(B, C, r, r), aug_level=(B,))``.
The low-resolution image is upsampled (bilinear) to the input's size and concatenated to x as C
more input channels of ``conv_in``; ``aug_level`` s in [0, 1] says how much it was noised
(noise-conditioning augmentation: low_res = alpha_s y + sigma_s z on the VP schedule, done by the
caller: training draws s, sampling picks one) and is embedded like time (sinusoids of 1000 s -> an
MLP whose last layer starts at zero) and added to the time embedding, so every residual block and
the GENIE head see it. ``aug_level=None`` means 0 (a clean low-resolution input). The new weights
(the extra ``conv_in`` channels when copied from a network without them, and the augmentation MLP's
output) start at zero: a super-resolution network initialised from an unconditional one computes
the same function until training moves them (`init_low_res_from`).

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
    low_res_size: int = 0  # > 0: a super-resolution network with a low_res input of this size

    def __post_init__(self):
        if self.time_input not in TIME_INPUTS:
            raise ValueError(f"unknown time_input {self.time_input!r}; known: {sorted(TIME_INPUTS)}")
        if not isinstance(self.num_classes, int) or isinstance(self.num_classes, bool) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0: unconditional), got {self.num_classes!r}")
        for name, least in (("in_channels", 1), ("image_size", 1), ("nf", 1), ("num_res_blocks", 0),
                            ("low_res_size", 0)):
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
        if self.low_res_size >= self.image_size:
            raise ValueError(f"UNetConfig.low_res_size {self.low_res_size} must be smaller than image_size "
                             f"{self.image_size} (0: no low-resolution input)")

    def to_dict(self) -> dict:
        """The fields as a JSON object; ``low_res_size`` only where set, so a network without a
        low-resolution input is written exactly as before the field existed."""
        d = dataclasses.asdict(self)
        if not self.low_res_size:
            del d["low_res_size"]
        return d

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
    "fmnist16_cond": UNetConfig(in_channels=1, image_size=16, nf=32, ch_mult=(1, 2, 2),
                                num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
                                time_input="log_gamma", num_classes=10),
    "fmnist_sr": UNetConfig(in_channels=1, image_size=32, nf=32, ch_mult=(1, 2, 2),
                            num_res_blocks=1, attn_resolutions=(8,), dropout=0.0,
                            time_input="log_gamma", num_classes=10, low_res_size=16),
    "tiny_low": UNetConfig(in_channels=1, image_size=4, nf=8, ch_mult=(1, 2), num_res_blocks=1,
                           attn_resolutions=(2,), dropout=0.0, time_input="log_gamma", num_classes=10),
    "tiny_sr": UNetConfig(in_channels=1, image_size=8, nf=8, ch_mult=(1, 2), num_res_blocks=1,
                          attn_resolutions=(4,), dropout=0.0, time_input="log_gamma", num_classes=10,
                          low_res_size=4),
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
        self.aug_emb = None
        if c.low_res_size:
            self.aug_emb = nn.Sequential(nn.Linear(nf, self.temb_dim), nn.SiLU(), nn.Linear(self.temb_dim, self.temb_dim))
            nn.init.zeros_(self.aug_emb[2].weight)  # starts as "no augmentation input"
            nn.init.zeros_(self.aug_emb[2].bias)
        self.conv_in = nn.Conv2d(c.in_channels * (2 if c.low_res_size else 1), nf, 3, padding=1)

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

    @property
    def cond_names(self) -> tuple:
        """The conditioning inputs it takes: labels (class-conditional), low_res and aug_level
        (a super-resolution network)."""
        return (("labels",) if self.config.num_classes else ()) + \
            (("low_res", "aug_level") if self.config.low_res_size else ())

    def _low_res_input(self, x: torch.Tensor, low_res, aug_level):
        """(x with the upsampled low-resolution channels, the augmentation level's embedding) or
        (x, None) for a network without a low-resolution input; refuses a wrong input by name."""
        c = self.config
        if not c.low_res_size:
            if low_res is not None or aug_level is not None:
                raise ValueError("low_res / aug_level given to a U-Net without a low-resolution input "
                                 "(config low_res_size = 0)")
            return x, None
        r, B = c.low_res_size, x.shape[0]
        if low_res is None:
            raise ValueError(f"this super-resolution U-Net needs low_res=(B, {c.in_channels}, {r}, {r}), "
                             f"the low-resolution image it upsamples (cond={{'low_res': ...}})")
        if not isinstance(low_res, torch.Tensor) or tuple(low_res.shape) != (B, c.in_channels, r, r):
            raise ValueError(f"low_res must be ({B}, {c.in_channels}, {r}, {r}) for x of shape {tuple(x.shape)}, "
                             f"got {tuple(getattr(low_res, 'shape', ())) or type(low_res).__name__}")
        if aug_level is None:
            aug_level = torch.zeros(B, device=x.device)
        if not isinstance(aug_level, torch.Tensor) or aug_level.dim() != 1 or aug_level.shape[0] != B \
                or not aug_level.is_floating_point():
            raise ValueError(f"aug_level must be a float tensor of shape ({B},) (the low-resolution input's "
                             f"noise level in [0, 1]), got {getattr(aug_level, 'shape', type(aug_level).__name__)}")
        up = F.interpolate(low_res.to(x.dtype), size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
        aug = self.aug_emb(timestep_embedding(aug_level, c.nf, scale=1000.0).to(x.dtype))
        return torch.cat([x, up], dim=1), aug

    def forward(self, x: torch.Tensor, t: torch.Tensor, return_features: bool = False,
                labels: torch.Tensor | None = None, low_res: torch.Tensor | None = None,
                aug_level: torch.Tensor | None = None):
        """Returns eps, or (eps, features (B, nf, H, W), temb (B, 4 nf)) with return_features.

        labels: (B,) int64 in 0 .. num_classes (num_classes = the null class), or None (all null);
        must be None for an unconditional network. low_res (B, C, r, r), aug_level (B,): the
        low-resolution input of a super-resolution network (module docstring); None otherwise."""
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
        x_in, aug = self._low_res_input(x, low_res, aug_level)
        if aug is not None:
            temb = temb + aug
        h = self.conv_in(x_in)
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


def downsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size, size) by averaging (H / size)^2 blocks (H a multiple of size)."""
    if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"images must be square (N, C, H, H), got shape {tuple(x.shape)}")
    h = x.shape[-1]
    if size < 1 or h % size:
        raise ValueError(f"cannot average-pool {h}x{h} images to {size}x{size} ({size} does not divide {h})")
    return x if size == h else F.avg_pool2d(x, h // size)


def augment_low_res(y: torch.Tensor, level: torch.Tensor, schedule,
                    generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """y noised at VP time ``level`` (B,): alpha_s y + sigma_s z, z drawn from ``generator`` unless
    ``noise`` is given (level 0 returns y itself: alpha_0 = 1, sigma_0 = 0)."""
    if noise is None:
        noise = torch.randn(y.shape, generator=generator, dtype=y.dtype).to(y.device)
    a = schedule.alpha(level.to(torch.float64)).to(y.dtype).view(-1, *([1] * (y.dim() - 1)))
    s = schedule.sigma(level.to(torch.float64)).to(y.dtype).view(-1, *([1] * (y.dim() - 1)))
    return a * y + s * noise.to(y.dtype)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
