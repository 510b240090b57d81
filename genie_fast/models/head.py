"""The GENIE prediction head and the (score network + head) model the solvers call.

GENIE (Dockhorn et al. 2022, arXiv 2210.05475, Sec. 3.2) distils d eps / d gamma along the DDIM
ODE into a small head k_psi that sees concat(x_t, eps_theta, the score network's last feature
map) and the network's time embedding:

    conv3x3 -> residual block(s) with the time embedding -> GroupNorm -> SiLU -> conv3x3 to 3C

and whose three channel blocks [h1 | h2 | h3] are combined (``ops.head_combine_ref``) as

    d eps / d gamma ~ -h1 / gamma + h2 gamma / (1 + gamma^2) + h3 / (gamma (1 + gamma^2)).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn
import torch.nn.functional as F

from ..ops import head_combine_ref
from ..schedule import VPSchedule
from ..checks import check_int
from .unet import UNet, ResBlock, _groups


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """in_channels: C of the image; feature_channels / temb_dim: from the score network."""

    in_channels: int = 1
    feature_channels: int = 32
    temb_dim: int = 128
    width: int = 32
    num_res_blocks: int = 1

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check_int(f"HeadConfig.{f.name}", getattr(self, f.name), 0 if f.name == "num_res_blocks" else 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HeadConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a HeadConfig is a JSON object of its fields, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown HeadConfig fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def for_unet(cls, unet: UNet, width: int | None = None, num_res_blocks: int = 1) -> "HeadConfig":
        return cls(in_channels=unet.config.in_channels, feature_channels=unet.feature_channels,
                   temb_dim=unet.temb_dim, width=width or unet.feature_channels,
                   num_res_blocks=num_res_blocks)


class GenieHead(nn.Module):
    """k_psi(x_t, eps, features, temb) -> raw head output (B, 3C, H, W) = [h1 | h2 | h3]."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = c = config
        self.conv_in = nn.Conv2d(2 * c.in_channels + c.feature_channels, c.width, 3, padding=1)
        self.blocks = nn.ModuleList([ResBlock(c.width, c.width, c.temb_dim, 0.0) for _ in range(c.num_res_blocks)])
        self.norm_out = nn.GroupNorm(_groups(c.width), c.width, eps=1e-6)
        self.conv_out = nn.Conv2d(c.width, 3 * c.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # start from d eps / d gamma = 0 (the DDIM step)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, eps, features, temb):
        h = self.conv_in(torch.cat([x, eps, features], dim=1))
        for block in self.blocks:
            h = block(h, temb)
        return self.conv_out(F.silu(self.norm_out(h)))


class GenieModel(nn.Module):
    """A frozen eps network with its distilled GENIE head, and the schedule both were trained with.

    * ``forward(x, t, labels=None, **cond) -> eps``
    * ``eps_and_head(x, t, labels=None, **cond) -> (eps, head_out)``, head_out raw (B, 3C, H, W) for fused kernels
    * ``eps_and_deps(x, t, labels=None, **cond) -> (eps, d eps / d gamma)``
      (cond: a super-resolution network's ``low_res`` and ``aug_level``, `UNet.forward`)
    * ``num_classes``: 0, or K for a class-conditional network (labels 0 .. K-1, K = null class)
    * ``image_shape``: (C, H, W); ``schedule``: the VPSchedule of training and distillation
    * ``head_error``: the head's measured relative error (saved with the model), or None

    x: (B, C, H, W); t: (B,) continuous VP times in [t_end, 1]. The head sees the network's own
    eps prediction and its detached features, exactly as in training (``genie_fast.distill``).
    """

    def __init__(self, unet: UNet, head: GenieHead | None = None, schedule: VPSchedule | None = None):
        super().__init__()
        self.unet = unet
        self.head = head if head is not None else GenieHead(HeadConfig.for_unet(unet))
        self.schedule = schedule if schedule is not None else VPSchedule()
        # the head's measured relative error (pooled, gamma-weighted, against the exact JVP), as
        # saved with the model; genie_multistep's blend reads it; None: not measured
        self.head_error: float | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the network was trained on (used by genie_fast.sample)."""
        c = self.unet.config
        return (c.in_channels, c.image_size, c.image_size)

    @staticmethod
    def _as_batch_t(x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        return t

    @property
    def num_classes(self) -> int:
        """Number of classes of a class-conditional network (label num_classes is the null class); 0 if unconditional."""
        return self.unet.config.num_classes

    @property
    def cond_names(self) -> tuple:
        """The conditioning inputs it takes (`genie_fast.conditioning`): labels, if class-conditional;
        low_res and aug_level, if a super-resolution network (`UNet.cond_names`)."""
        return self.unet.cond_names

    def forward(self, x: torch.Tensor, t, labels: torch.Tensor | None = None, **cond) -> torch.Tensor:
        return self.unet(x, self._as_batch_t(x, t), labels=labels, **cond)

    def eps_and_head(self, x: torch.Tensor, t, labels: torch.Tensor | None = None, **cond):
        eps, features, temb = self.unet(x, self._as_batch_t(x, t), return_features=True, labels=labels, **cond)
        head_out = self.head(x, eps.detach(), features.detach(), temb.detach())
        return eps, head_out

    def eps_and_deps(self, x: torch.Tensor, t, labels: torch.Tensor | None = None, **cond):
        t = self._as_batch_t(x, t)
        eps, head_out = self.eps_and_head(x, t, labels, **cond)
        gamma = self.schedule.gamma(t.to(torch.float32)).to(head_out.dtype)[:, None, None, None]
        return eps, head_combine_ref(head_out, gamma)
