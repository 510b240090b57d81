"""A diffusers ``UNet2DModel`` or ``UNet2DConditionModel`` as a genie_fast eps model, with an optional
distilled GENIE head.

    from diffusers import UNet2DModel, DDIMScheduler
    unet = UNet2DModel.from_pretrained("my_model", subfolder="unet")
    scheduler = DDIMScheduler.from_pretrained("my_model", subfolder="scheduler")
    model = from_diffusers(unet, scheduler, head_path="my_model/genie_head")   # head: optional
    x0, nfe = genie_fast.sample(model, noise=z, solver="genie", nfe=10)

The model takes genie_fast's continuous time t in [1/N, 1] (N = ``num_train_timesteps``) and calls
the UNet at the diffusers timestep ``tau = N t - 1``, so diffusers timestep k sits at t = (k + 1) / N
(``schedule.time_of_step(k)``) and a fractional tau is what the network sees between steps. The
schedule (``DiffusersSchedule``, a ``DiscreteVPSchedule``) is alpha_bar of the scheduler config
(``linear``, ``scaled_linear``, ``squaredcos_cap_v2`` or ``trained_betas``), computed exactly as
diffusers computes it (float32 cumprod), with log alpha interpolated linearly between steps.
``v_prediction`` outputs become eps = alpha_t v + sigma_t x; ``epsilon`` outputs are used as is.

Scheduler options, and the genie_fast call that reproduces the diffusers loop
(``scheduler_grid(scheduler)`` returns ``grid=``, ``denoise=`` and ``afs=False`` for the timesteps it was
set to):

* timesteps (any ``timestep_spacing``, ``steps_offset``): the grid is ``time_of_step(timesteps)``.
  DDIMScheduler steps from timestep k to k - N // num_inference_steps, which is the next timestep
  of its list for ``leading`` and for ``trailing`` when num_inference_steps divides N, but not for
  ``linspace`` (its loop then evaluates the network at one time and steps from another; no ODE
  grid matches it, and ``scheduler_grid`` refuses it).
* DDIM ``set_alpha_to_one=True``: the last step ends on alpha = 1, i.e. t = 0, which genie_fast
  reaches by the final denoising step: ``denoise=True`` (x0 = (x - sigma eps) / alpha).
  ``set_alpha_to_one=False``: the last step ends on alpha_bar[0], t = 1 / N: one more grid time,
  or none when the last timestep is 0 already (diffusers then spends one NFE on a step of length 0).
* DPMSolverMultistep (``dpmsolver++``, ``solver_order=2``, ``solver_type="midpoint"``) is
  ``dpmpp_2m``: the same first-order first step and the same multistep update
  x_bar' = r x_bar + (1 - r) (x0_n + (x0_n - x0_{n-1}) / (2 q)).
  ``final_sigmas_type="zero"``: the last step goes to sigma = 0 and diffusers makes it first order,
  x = x0_n: ``denoise=True``. ``"sigma_min"``: one more grid time t = 1 / N, no denoising.
  ``lower_order_final`` (default True, used below 15 steps) and ``euler_at_final`` make that last
  step first order (a DDIM step) where ``dpmpp_2m`` keeps order 2: no single call matches, so
  ``scheduler_grid`` refuses it (``lower_order_final=False`` matches; with ``"zero"`` it is moot).
  Karras / exponential / beta / Lu sigmas round the network's timesteps away from the sigmas it
  steps with, so they are refused too; genie_fast's ``grid="edm"`` is the Karras grid without the
  rounding. DDIM ``clip_sample`` and thresholding have no counterpart in an ODE solver.

Class-conditional UNets (``num_class_embeds = K + 1``) follow genie_fast's convention: labels
0..K-1 are classes and K (the last embedding) is the null class that classifier-free guidance
uses and that ``labels=None`` runs; ``genie_fast.guidance.conditioned`` wraps them as usual.

A ``UNet2DConditionModel`` (text embeddings through cross-attention, usually in a VAE's latent
space) takes its inputs as genie_fast's ``cond`` (``model.cond_names``; `models.diffusers_cond`):
``sample(model, cond={"encoder_hidden_states": emb}, negative_cond=..., guidance_scale=...)``.
``from_diffusers(..., vae=vae)`` marks the model ``space = "latent"`` and gives it ``decode``
(``sample(..., decode=True)`` returns images); ``null_cond=`` is its default negative branch.

The GENIE head reads the UNet's last feature map (the input of ``conv_norm_out``) and its time
embedding (plus the class embedding) through forward hooks registered for the one call and removed
after it: the user's module keeps its code, weights and hooks. ``genie-fast distill --diffusers DIR`` distils it (``genie_fast.distill_diffusers``);
``save_head`` writes ``<stem>.safetensors`` + ``<stem>.json`` beside the model, and
``from_diffusers(..., head_path=stem)`` loads it, so the model offers ``eps_and_head`` like the
bundled one. Without a head the model is a plain eps model (``genie`` then asks for one).

JVPs (``genie_exact``, the distillation targets) through the UNet's attention blocks run with
``genie_fast.solvers.jvp`` (math attention and contiguous GroupNorm tangents inside the JVP);
``torch.func.jvp`` on the bare model fails in PyTorch's fused attention kernels.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from ..checks import require
from ..files import weights_hash
from ..schedule import DiscreteVPSchedule
from ..conditioning import check_cond, check_cond_names
from .diffusers_cond import cond_names, last_resnet, unet_kwargs, vae_decoder
from .head import GenieHead, GenieModel, HeadConfig

__all__ = ["from_diffusers", "load_diffusers", "DiffusersSchedule", "DiffusersUNet", "DiffusersGenieModel",
           "scheduler_grid", "save_head", "load_head", "alphas_cumprod_from_config",
           "HEAD_STEM", "BETA_SCHEDULES", "PREDICTION_TYPES"]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
HEAD_STEM = "genie_head"            # <model dir>/genie_head.safetensors + .json
HEAD_FORMAT = "genie_fast.DiffusersGenieHead"
HEAD_VERSION = 1


def _diffusers():
    return require("diffusers", "diffusers models (from_diffusers, load_diffusers, --diffusers)")


def _config_dict(scheduler) -> dict:
    cfg = scheduler if isinstance(scheduler, dict) else getattr(scheduler, "config", None)
    if cfg is None:
        raise TypeError(f"scheduler must be a diffusers scheduler or its config dict, got {type(scheduler).__name__}")
    return dict(cfg)


def alphas_cumprod_from_config(config: dict) -> torch.Tensor:
    """alpha_bar_n (float32, N values) exactly as diffusers' DDPM/DDIM/DPM schedulers compute it."""
    n = int(config.get("num_train_timesteps", 1000))
    if config.get("rescale_betas_zero_snr"):
        raise ValueError("rescale_betas_zero_snr=True puts alpha_bar = 0 (infinite gamma) at the last step; "
                         "genie_fast's solvers need a finite gamma at t = 1")
    trained = config.get("trained_betas")
    kind = config.get("beta_schedule", "linear")
    b0, b1 = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    if trained is not None:
        betas = torch.tensor(trained, dtype=torch.float32)
    elif kind == "linear":
        betas = torch.linspace(b0, b1, n, dtype=torch.float32)
    elif kind == "scaled_linear":
        betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=torch.float32) ** 2
    elif kind == "squaredcos_cap_v2":
        def f(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float32)
    else:
        raise ValueError(f"beta_schedule {kind!r} is not supported; choose one of {BETA_SCHEDULES} or trained_betas")
    return torch.cumprod(1.0 - betas, dim=0)


class DiffusersSchedule(DiscreteVPSchedule):
    """The discrete schedule of a diffusers scheduler in genie_fast time: step k at t = (k + 1) / N.

    Unlike a bare DiscreteVPSchedule, ``model_time(t) = t``: the adapter model maps t to the
    UNet's timestep itself (``step_of_time``), so JVPs in t reach the network's time input.
    """

    def __init__(self, alphas_cumprod, t_end: float | None = None):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        betas = 1.0 - ac / torch.cat([ac.new_ones(1), ac[:-1]])
        super().__init__(betas, t_end=t_end)
        self._log_alphas = 0.5 * torch.log(ac)  # exactly diffusers' alpha_bar, not a re-derived cumprod
        self.alphas_cumprod = ac

    @classmethod
    def from_config(cls, scheduler, **kw) -> "DiffusersSchedule":
        """From a diffusers scheduler (its ``alphas_cumprod``) or a scheduler config dict."""
        ac = getattr(scheduler, "alphas_cumprod", None)
        if ac is None or isinstance(scheduler, dict):
            ac = alphas_cumprod_from_config(_config_dict(scheduler))
        elif _config_dict(scheduler).get("rescale_betas_zero_snr"):
            alphas_cumprod_from_config(_config_dict(scheduler))  # raises with the reason
        return cls(ac, **kw)

    def __repr__(self):
        return f"DiffusersSchedule(num_steps={self.num_steps}, t_end={self.t_end})"

    def time_of_step(self, timesteps):
        """genie_fast time (float64) of diffusers timesteps: t = (k + 1) / N."""
        return (torch.as_tensor(timesteps).to(torch.float64) + 1.0) / self.num_steps

    def step_of_time(self, t):
        """The (fractional) diffusers timestep tau = N t - 1 of a genie_fast time."""
        return t * self.num_steps - 1.0

    def model_time(self, t):
        return t


@dataclasses.dataclass(frozen=True)
class _NetConfig:
    """What GenieModel and HeadConfig.for_unet read from a score network's config."""

    in_channels: int
    image_size: int
    num_classes: int


class DiffusersUNet(nn.Module):
    """eps(x, t) of a diffusers UNet2DModel at genie_fast's continuous time t (B,) or scalar.

    ``forward(x, t, return_features=False, labels=None)``: eps (B, C, H, W) in x's dtype, or with
    return_features (eps, last feature map (B, F, H, W), time embedding (B, D)) captured by hooks,
    the interface genie_fast's own U-Net offers the GENIE head and ``genie_fast.distill.head_loss``.
    """

    def __init__(self, unet, schedule: DiffusersSchedule, prediction_type: str = "epsilon"):
        super().__init__()
        diffusers = _diffusers()
        if not isinstance(unet, (diffusers.UNet2DModel, diffusers.UNet2DConditionModel)):
            raise TypeError(f"from_diffusers takes a diffusers UNet2DModel or UNet2DConditionModel, got "
                            f"{type(unet).__name__}")
        self.conditional = isinstance(unet, diffusers.UNet2DConditionModel)
        cfg = unet.config
        if cfg.time_embedding_type != "positional":
            raise ValueError(f"time_embedding_type {cfg.time_embedding_type!r} is not supported (only 'positional': "
                             f"a VP model of the diffusers timestep)")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} is not supported; choose one of {PREDICTION_TYPES}")
        if cfg.class_embed_type is not None and not self.conditional:
            raise ValueError(f"class_embed_type {cfg.class_embed_type!r} takes non-integer class inputs; only "
                             f"integer labels (num_class_embeds, class_embed_type None) are supported")
        if int(cfg.get("num_train_timesteps") or schedule.num_steps) != schedule.num_steps:
            raise ValueError(f"the UNet was configured for {cfg.num_train_timesteps} train timesteps, "
                             f"the scheduler for {schedule.num_steps}")
        c = int(cfg.in_channels)
        if cfg.out_channels not in (c, 2 * c):
            raise ValueError(f"UNet out_channels {cfg.out_channels} must be in_channels ({c}) or twice that "
                             f"(learned variance, whose second half is ignored)")
        size = cfg.sample_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size))
        self.unet = unet
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.image_shape = (c, *size)
        self._integer_classes = bool(cfg.num_class_embeds and cfg.class_embed_type is None)
        self.num_classes = int(cfg.num_class_embeds) - 1 if self._integer_classes else 0
        self.config = _NetConfig(c, size[0], self.num_classes)
        self.feature_channels = int(cfg.block_out_channels[0])
        # genie_fast's cond names (models.diffusers_cond); labels are the integer classes
        self.cond_names = (cond_names(unet) if self.conditional else ()) + (("labels",) if self.num_classes else ())
        if self.conditional:
            self.temb_dim = int(last_resnet(unet).time_emb_proj.in_features)
        else:
            self.temb_dim = int(unet.time_embedding.linear_2.out_features)
        self.space = "pixel"  # from_diffusers(..., vae=) makes it "latent", with .decode
        # log alpha at the N train steps, float64 whatever dtype the module is cast to (see _apply)
        self.register_buffer("log_alpha_table", schedule._log_alphas.clone(), persistent=False)

    def _capture_hooks(self, captured: dict) -> list:
        """Hooks, for one call, that put the last feature map (the input of conv_norm_out) and the
        time (+ class) embedding into captured. Registered per call and removed after it, so the
        user's UNet carries nothing of ours between calls (and copies of it carry nothing either)."""
        unet = self.unet
        feature_module = unet.conv_norm_out if unet.conv_norm_out is not None else unet.conv_out

        def keep(name):
            def hook(module, args, output):
                captured[name] = output
            return hook
        handles = [feature_module.register_forward_pre_hook(lambda module, args: captured.update(features=args[0]))]
        if self.conditional:  # the embedding the residual blocks see (models.diffusers_cond)
            def temb(module, args, kwargs):
                captured["temb"] = args[1] if len(args) > 1 else kwargs["temb"]
            return handles + [last_resnet(unet).register_forward_pre_hook(temb, with_kwargs=True)]
        handles.append(unet.time_embedding.register_forward_hook(keep("temb")))
        if unet.class_embedding is not None:
            handles.append(unet.class_embedding.register_forward_hook(keep("class_emb")))
        return handles

    def _apply(self, fn, recurse=True):
        table = self.log_alpha_table
        super()._apply(fn, recurse)
        self.log_alpha_table = table.to(self.log_alpha_table.device)  # keep float64 through .half()/.to(dtype)
        return self

    def _alpha_sigma(self, tau: torch.Tensor):
        """alpha_t, sigma_t at fractional timestep tau, interpolated as DiscreteVPSchedule does."""
        la = self.log_alpha_table
        i = tau.detach().floor().clamp(0, len(la) - 2).long()
        w = tau.to(la.dtype) - i.to(la.dtype)
        log_alpha = la[i] + w * (la[i + 1] - la[i])
        return torch.exp(log_alpha), torch.sqrt(-torch.expm1(2.0 * log_alpha))

    def _timestep(self, t: torch.Tensor) -> torch.Tensor:
        """tau = N t - 1 (float64). A float32 t cannot hold (k + 1) / N exactly (0.9 is stored as
        0.89999998), which puts tau 3e-5 below the step k and, on a steep schedule, moves the
        interpolated alpha by 2e-4 relative; a tau within t's resolution of an integer is that step.
        The shift is detached, so d tau / dt = N stays exact for JVPs."""
        tau = self.schedule.step_of_time(t.to(torch.float64))
        if t.dtype == torch.float64:
            return tau
        step = tau.detach().round()
        near = (tau.detach() - step).abs() <= 2.0 * self.schedule.num_steps * torch.finfo(t.dtype).eps
        return torch.where(near, tau + (step - tau).detach(), tau)

    def forward(self, x: torch.Tensor, t, return_features: bool = False, labels: torch.Tensor | None = None,
                **cond):
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        tau = self._timestep(t)
        kw = {}
        if self._integer_classes:
            kw["class_labels"] = labels if labels is not None else torch.full((x.shape[0],), self.num_classes,
                                                                             dtype=torch.long, device=x.device)
        elif labels is not None:
            raise ValueError("labels were given but the UNet is not class-conditional (num_class_embeds is None)")
        if self.conditional:
            kw.update(unet_kwargs(self.unet, cond))
        elif cond:
            raise ValueError(f"cond {sorted(cond)} was given but a UNet2DModel takes no conditioning inputs "
                             f"(labels aside)")
        captured = {}
        handles = self._capture_hooks(captured) if return_features else []
        try:  # the UNet runs in its own dtype (e.g. float32 under a float64 ODE state)
            out = self.unet(x.to(self.unet.dtype), tau, return_dict=False, **kw)[0]
        finally:
            for h in handles:
                h.remove()
        eps = out[:, :x.shape[1]].to(x.dtype)  # a learned-variance UNet's second half is dropped
        if self.prediction_type == "v_prediction":  # eps = alpha v + sigma x, in the state's dtype
            alpha, sigma = self._alpha_sigma(tau)
            view = (-1, *([1] * (x.dim() - 1)))
            eps = alpha.view(view).to(x.dtype) * eps + sigma.view(view).to(x.dtype) * x
        if not return_features:
            return eps
        temb = captured["temb"] + captured["class_emb"] if "class_emb" in captured else captured["temb"]
        return eps, captured["features"], temb


class DiffusersGenieModel(GenieModel):
    """GenieModel around a DiffusersUNet (any (C, H, W), not only square images); conditioning
    inputs (``**cond``) go to the UNet, and the head reads the features of that same call."""

    @property
    def image_shape(self):
        return self.unet.image_shape

    @property
    def cond_names(self) -> tuple:
        return self.unet.cond_names

    def __getattr__(self, name):  # the adapter's null_cond, space, decode
        if name in ("null_cond", "space", "decode"):
            return getattr(self.unet, name)
        return super().__getattr__(name)

    def forward(self, x: torch.Tensor, t, labels: torch.Tensor | None = None, **cond) -> torch.Tensor:
        return self.unet(x, self._as_batch_t(x, t), labels=labels, **cond)

    def eps_and_head(self, x: torch.Tensor, t, labels: torch.Tensor | None = None, **cond):
        eps, features, temb = self.unet(x, self._as_batch_t(x, t), return_features=True, labels=labels, **cond)
        return eps, self.head(x, eps.detach(), features.detach(), temb.detach())


def head_config_for(net: DiffusersUNet, width: int | None = None, num_res_blocks: int = 1) -> HeadConfig:
    return HeadConfig.for_unet(net, width=width, num_res_blocks=num_res_blocks)


def _stem(path) -> Path:
    p = Path(path)
    if p.is_dir():
        return p / HEAD_STEM
    return p.with_suffix("") if p.suffix in (".json", ".safetensors") else p


def save_head(head: GenieHead, path, unet_sha256: str | None = None, provenance: dict | None = None) -> Path:
    """Write <stem>.safetensors (the head's float32 weights) and <stem>.json; path may be the model
    folder (stem ``genie_head`` in it). Each file goes to a temporary name first, then is renamed."""
    from safetensors.torch import save_file

    stem = _stem(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    config = {"format": HEAD_FORMAT, "version": HEAD_VERSION, "head": head.config.to_dict(),
              "unet_sha256": unet_sha256, "provenance": provenance or {}}
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in head.state_dict().items()}
    st, js = Path(f"{stem}.safetensors"), Path(f"{stem}.json")
    save_file(tensors, f"{st}.tmp", metadata={"format": HEAD_FORMAT})
    os.replace(f"{st}.tmp", st)
    Path(f"{js}.tmp").write_text(json.dumps(config, indent=2) + "\n")
    os.replace(f"{js}.tmp", js)
    return stem


def load_head(path, net: DiffusersUNet | None = None, check_unet: bool = True) -> GenieHead:
    """Load a head saved by :func:`save_head`; with ``net``, check that it fits that network
    (feature / time-embedding sizes, and the UNet weights' hash it was distilled for)."""
    from .default import read_weights

    stem = _stem(path)
    js, st = Path(f"{stem}.json"), Path(f"{stem}.safetensors")
    for f in (js, st):
        if not f.exists():
            raise FileNotFoundError(f"GENIE head file {f} not found (a head is <stem>.json + <stem>.safetensors)")
    try:
        config = json.loads(js.read_text())
        if config.get("format") != HEAD_FORMAT or config.get("version") != HEAD_VERSION:
            raise ValueError(f"expected format {HEAD_FORMAT!r} version {HEAD_VERSION}, found "
                             f"{config.get('format')!r} version {config.get('version')!r}")
        head = GenieHead(HeadConfig.from_dict(config["head"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{js}: not a GENIE head config ({type(e).__name__}: {e})") from None
    if net is not None:
        hc = head.config
        want = (net.config.in_channels, net.feature_channels, net.temb_dim)
        if (hc.in_channels, hc.feature_channels, hc.temb_dim) != want:
            raise ValueError(f"{js}: the head reads (channels, features, temb) = "
                             f"{(hc.in_channels, hc.feature_channels, hc.temb_dim)}, this UNet gives {want}")
        if check_unet and config.get("unet_sha256") and weights_hash(net.unet) != config["unet_sha256"]:
            raise ValueError(f"{js}: the head was distilled for other UNet weights (sha256 "
                             f"{config['unet_sha256'][:12]}...); pass check_unet=False to use it anyway")
    head.load_state_dict(read_weights(st, head.state_dict(), js))  # names, shapes, float32, finite
    head.provenance = config.get("provenance", {})
    return head


def from_diffusers(unet, scheduler, head_path=None, check_unet: bool = True, vae=None, null_cond=None):
    """A genie_fast model of a diffusers UNet2DModel or UNet2DConditionModel and the scheduler (or
    config dict) it was trained with.

    Returns a :class:`DiffusersUNet` (an eps model for every solver except ``genie``) or, with
    ``head_path`` (a head stem, or the folder holding ``genie_head.*``), a
    :class:`DiffusersGenieModel` that also offers ``eps_and_head``. Both carry ``.schedule``
    (a :class:`DiffusersSchedule`), ``.image_shape``, ``.num_classes`` and ``.space`` ("pixel", or
    "latent" with a vae); the head and the adapter follow the UNet's device and dtype.
    A UNet2DConditionModel takes its inputs as ``cond`` (``.cond_names``; `models.diffusers_cond`).
    vae: the AutoencoderKL of a latent model: ``.decode`` (`diffusers_cond.VAEDecoder`) turns its
    samples into images (``sample(..., decode=True)``). null_cond: the model's null input, the
    default negative branch of guidance (e.g. ``{"encoder_hidden_states": the empty prompt's
    embeddings (1, L, D)}``).
    """
    cfg = _config_dict(scheduler)
    schedule = DiffusersSchedule.from_config(scheduler)
    net = DiffusersUNet(unet, schedule, cfg.get("prediction_type", "epsilon"))
    if vae is not None:
        net.decode, net.space = vae_decoder(vae), "latent"
    if null_cond is not None:
        net.null_cond = check_cond(null_cond, 1, "null_cond")
        check_cond_names(net, net.null_cond, "null_cond")
    if head_path is None:
        return net
    head = load_head(head_path, net, check_unet=check_unet)
    param = next(unet.parameters())
    model = DiffusersGenieModel(net, head.to(param.device, param.dtype), schedule)
    model.provenance = head.provenance
    return model


def _find_model_dir(path: Path) -> tuple[Path, str | None, Path]:
    """(UNet folder, subfolder or None, scheduler config file) of a pipeline folder or a UNet folder."""
    if (path / "unet" / "config.json").exists():
        unet_dir, sub = path, "unet"
    elif (path / "config.json").exists():
        unet_dir, sub = path, None
    else:
        raise FileNotFoundError(f"{path}: no diffusers UNet (expected {path}/unet/config.json or {path}/config.json)")
    for cand in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json"):
        if cand.exists():
            return unet_dir, sub, cand
    raise FileNotFoundError(f"{path}: no scheduler config (expected {path}/scheduler/scheduler_config.json "
                            f"or {path}/scheduler_config.json)")


def load_diffusers(path, head="auto", device=None, check_unet: bool = True):
    """Load a model saved with diffusers' ``save_pretrained`` from a local folder (never a hub):
    a pipeline folder (``unet/`` + ``scheduler/``, and ``vae/`` for a latent model: its decoder
    becomes the model's ``decode``) or a UNet folder with ``scheduler_config.json``. The UNet is a
    UNet2DModel or a UNet2DConditionModel, as its config's ``_class_name`` says.

    head: "auto" loads ``<folder>/genie_head.*`` when present, None never, or a head stem.
    """
    diffusers = _diffusers()
    path = Path(path)
    unet_dir, sub, sched_file = _find_model_dir(path)
    kw = {"subfolder": sub} if sub else {}
    from .default import ModelFileError, read_json

    kind = read_json(unet_dir / (sub or "") / "config.json").get("_class_name", "UNet2DModel")
    if kind not in ("UNet2DModel", "UNet2DConditionModel"):
        raise ModelFileError(f"{unet_dir}: the UNet is a {kind}; UNet2DModel and UNet2DConditionModel are supported")
    unet = getattr(diffusers, kind).from_pretrained(str(unet_dir), local_files_only=True, **kw).eval()
    vae = None
    if sub and (path / "vae" / "config.json").exists():
        vae = diffusers.AutoencoderKL.from_pretrained(str(path), subfolder="vae", local_files_only=True).eval()
    if device is not None:
        unet = unet.to(device)
        vae = vae.to(device) if vae is not None else None

    bad = [k for k, v in unet.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ModelFileError(f"{unet_dir}: the UNet has non-finite (NaN or inf) weights in {', '.join(bad[:5])}")
    scheduler_config = read_json(sched_file)
    if head == "auto":
        head = path / HEAD_STEM if Path(f"{path / HEAD_STEM}.safetensors").exists() else None
    model = from_diffusers(unet, scheduler_config, head_path=head, check_unet=check_unet, vae=vae)
    model.source = str(path)
    model.grids_path = path / "genie_fast.grids.json"  # its tuned grids, if any (genie_fast.grid_store)
    return model


# --------------------------------------------------------------------------- diffusers loops as grids

def _ddim_grid(scheduler, schedule) -> tuple[list[float], bool]:
    cfg = scheduler.config
    steps = [int(k) for k in scheduler.timesteps]
    ratio = cfg.num_train_timesteps // scheduler.num_inference_steps
    for k, k_next in zip(steps[:-1], steps[1:]):
        if k - ratio != k_next:
            raise ValueError(f"DDIMScheduler steps from timestep {k} to {k - ratio}, not to the next timestep of its "
                             f"list ({k_next}; timestep_spacing={cfg.timestep_spacing!r}): its loop evaluates the "
                             f"network at one time and steps from another, which no genie_fast grid reproduces")
    ts = schedule.time_of_step(steps).tolist()
    last = steps[-1] - ratio
    if last >= 0:
        return ts + [float(schedule.time_of_step(last))], False
    if cfg.set_alpha_to_one:
        return ts, True                     # ends on alpha = 1: the denoising step
    t_end = float(schedule.time_of_step(0))  # ends on alpha_bar[0]
    return (ts + [t_end] if ts[-1] > t_end else ts), False


def _dpmpp_grid(scheduler, schedule) -> tuple[list[float], bool]:
    cfg = scheduler.config
    if cfg.algorithm_type != "dpmsolver++" or cfg.solver_order != 2 or cfg.solver_type != "midpoint":
        raise ValueError(f"only algorithm_type='dpmsolver++', solver_order=2, solver_type='midpoint' is dpmpp_2m; got "
                         f"{cfg.algorithm_type!r}, order {cfg.solver_order}, {cfg.solver_type!r}")
    for opt in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas"):
        if cfg.get(opt):
            raise ValueError(f"{opt}=True evaluates the network at rounded timesteps, not at its sigmas; use "
                             f"genie_fast's own grids (grid='edm' is the Karras grid) instead")
    steps = [int(k) for k in scheduler.timesteps]
    ts = schedule.time_of_step(steps).tolist()
    if cfg.final_sigmas_type == "zero":
        return ts, True
    first_order_last = cfg.euler_at_final or (cfg.lower_order_final and len(steps) < 15)
    if first_order_last:
        raise ValueError("with final_sigmas_type='sigma_min', lower_order_final (below 15 steps) or euler_at_final "
                         "makes diffusers' last step first order, where dpmpp_2m keeps order 2; set "
                         "lower_order_final=False, or use final_sigmas_type='zero'")
    t_end = float(schedule.time_of_step(0))
    return (ts + [t_end] if ts[-1] > t_end else ts), False


def scheduler_grid(scheduler, schedule: DiffusersSchedule | None = None) -> dict:
    """``{"grid": times, "denoise": bool, "afs": False}``: the keyword arguments with which
    ``genie_fast.sample(model, noise=x_T, solver=..., **scheduler_grid(scheduler))`` runs ``ddim``
    (for a DDIMScheduler) or ``dpmpp_2m`` (for a DPMSolverMultistepScheduler) as the scheduler's own
    loop over the timesteps ``set_timesteps`` gave it (diffusers evaluates the network at the first
    timestep: no analytical first step). Raises ValueError for options no genie_fast call matches."""
    schedule = schedule or DiffusersSchedule.from_config(scheduler)
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("call scheduler.set_timesteps(...) first")
    name = type(scheduler).__name__
    if name == "DDIMScheduler":
        ts, denoise = _ddim_grid(scheduler, schedule)
    elif name == "DPMSolverMultistepScheduler":
        ts, denoise = _dpmpp_grid(scheduler, schedule)
    else:
        raise ValueError(f"no genie_fast grid for {name}; DDIMScheduler and DPMSolverMultistepScheduler are mapped")
    return {"grid": torch.tensor(ts, dtype=torch.float64), "denoise": denoise, "afs": False}
