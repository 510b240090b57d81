"""The conditioning inputs of a diffusers ``UNet2DConditionModel`` (the UNet of the Stable Diffusion
family) as genie_fast ``cond`` names, and the decoder of a latent model's VAE.

genie_fast hands conditioning to a model as one flat mapping of batch-first tensors
(`genie_fast.conditioning`); the UNet takes some of them as arguments and the "added conditions"
of its ``addition_embed_type`` inside ``added_cond_kwargs``:

    encoder_hidden_states   (B, L, D) text embeddings, through cross-attention (required)
    encoder_attention_mask  (B, L) 1 = keep, 0 = discard
    timestep_cond           (B, D') (a guidance-distilled UNet's w embedding)
    class_labels            (B,) or (B, D) for class_embed_type "timestep" / "projection" / "identity"
    text_embeds, time_ids   addition_embed_type "text_time" (SDXL)
    image_embeds, hint      "image" / "text_image" / "image_hint" (Kandinsky)

(integer classes of ``num_class_embeds`` with no class_embed_type are genie_fast's ``labels``).

The GENIE head reads the time embedding the network's residual blocks see (the input ``temb`` of
its last one: time + class + added embeddings, after ``time_embed_act``), captured by a hook for
the one call like its features: the head sees what the network sees, for each branch of a
guided call.
"""
from __future__ import annotations

import torch

__all__ = ["ADDED_NAMES", "cond_names", "unet_kwargs", "last_resnet", "VAEDecoder", "vae_decoder"]

# addition_embed_type -> the names that go into added_cond_kwargs
ADDED_NAMES = {None: (), "text": (), "text_time": ("text_embeds", "time_ids"),
               "text_image": ("text_embeds", "image_embeds"), "image": ("image_embeds",),
               "image_hint": ("image_embeds", "hint")}


def cond_names(unet) -> tuple:
    """The cond names a UNet2DConditionModel takes (its config decides the added ones)."""
    cfg = unet.config
    kind = cfg.addition_embed_type
    if kind not in ADDED_NAMES:
        raise ValueError(f"addition_embed_type {kind!r} is not supported; supported: {sorted(map(str, ADDED_NAMES))}")
    names = ["encoder_hidden_states", "encoder_attention_mask"]
    if unet.time_embedding.cond_proj is not None:
        names.append("timestep_cond")
    if unet.class_embedding is not None and cfg.class_embed_type is not None:
        names.append("class_labels")
    return tuple(names) + ADDED_NAMES[kind]


def unet_kwargs(unet, cond: dict) -> dict:
    """The UNet's keyword arguments of a flat cond mapping: added conditions gathered into
    ``added_cond_kwargs``, floating inputs in the UNet's dtype (a float32 embedding under an fp16
    copy of the network), the others as they are."""
    if "encoder_hidden_states" not in cond:
        raise ValueError("a UNet2DConditionModel needs cond={'encoder_hidden_states': text embeddings (B, L, D)}")
    added = ADDED_NAMES[unet.config.addition_embed_type]
    kw, extra = {}, {}
    for k, v in cond.items():
        if v.is_floating_point() and k != "encoder_attention_mask":
            v = v.to(unet.dtype)
        (extra if k in added else kw)[k] = v
    missing = [k for k in added if k not in extra and not (k == "text_embeds" and
                                                            unet.config.addition_embed_type == "text_image")]
    if missing:
        raise ValueError(f"the UNet's addition_embed_type {unet.config.addition_embed_type!r} needs cond names "
                         f"{missing}")
    if extra or added:
        kw["added_cond_kwargs"] = extra
    return kw


def last_resnet(unet):
    """The UNet's last residual block: its ``temb`` input is the embedding every block sees."""
    return unet.up_blocks[-1].resnets[-1]


class VAEDecoder:
    """A diffusers ``AutoencoderKL``'s decoder as a callable latents -> images, the way diffusers'
    pipelines decode: ``vae.decode(z / scaling_factor + shift_factor).sample`` (in the VAE's dtype;
    images in [-1, 1], returned in the latents' dtype)."""

    def __init__(self, vae):
        self.vae = vae
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
        shift = getattr(vae.config, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0

    def __deepcopy__(self, memo):  # the engine's copies of the model share the one VAE
        return self

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        z = latents / self.scaling_factor + self.shift_factor
        param = next(vae.parameters())
        with torch.no_grad():
            images = vae.decode(z.to(param.device, param.dtype)).sample
        return images.to(latents.dtype)


def vae_decoder(vae) -> VAEDecoder:
    """`VAEDecoder` of a diffusers AutoencoderKL (anything with ``.decode(z).sample`` and a config)."""
    if not callable(getattr(vae, "decode", None)) or getattr(vae, "config", None) is None:
        raise TypeError(f"vae must be a diffusers AutoencoderKL (with .decode and .config), got {type(vae).__name__}")
    return VAEDecoder(vae)
