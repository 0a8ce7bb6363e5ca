"""Hires fix, as A1111's: the first pass at the request's size, upscaled (its latents with torch's interpolate in
the "Latent" modes, else the decoded picture with PIL), then re-drawn at the larger size by image-to-image at
`hires_strength` for `hires_steps` (0: the first pass's steps), with its own sampler, prompt and negative prompt
when given. Each image's generator carries on from the first pass into the second, as A1111's per-image RNG
does (its second pass draws the next noise from the same seeds), so image k of seed S + k stays the same image
whatever its batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gen.generation.options import Options
from gen.generation.upscale import LATENT_MODES, cover, crop_box, resize_image, target_size


def hires_size(pipe, o: Options, height: int, width: int) -> tuple[int, int]:
    """(height, width) of the second pass, from the first pass's height x width."""
    w, h = target_size(width, height, o.hires_scale, o.hires_width, o.hires_height, pipe.latent_stride)
    return h, w


def upscale_latents(
    latents: torch.Tensor, height: int, width: int, factor: int, upscaler: str
) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, C, height / factor, width / factor) with A1111's latent mode `upscaler`,
    covering and centre-cropping where the aspect ratio changes."""
    mode, antialias = LATENT_MODES[upscaler]
    to_h, to_w = height // factor, width // factor
    w, h = cover(latents.shape[-1], latents.shape[-2], to_w, to_h)
    x = F.interpolate(latents, size=(h, w), mode=mode, antialias=antialias)  # (B, C, h', w')
    left, top, right, bottom = crop_box(w, h, to_w, to_h)
    return x[..., top:bottom, left:right]


def render_hires(
    first_pipe,
    second_pipe,
    o: Options,
    prompts: list[str],
    kwargs: dict,
    first_extra: dict | None = None,
    second_extra: dict | None = None,
) -> list:
    """PIL images of one batch with hires fix: `first_pipe` (text-to-image) makes the small ones, `second_pipe`
    (image-to-image, sharing the weights, with the hires sampler) re-draws them upscaled. `kwargs` are the first
    pass's call arguments (generators, guidance, size, step callback), shared by the second; `first_extra` and
    `second_extra` each pass's own (its ControlNet inputs at its size)."""
    latent = o.hires_upscaler in LATENT_MODES
    small = first_pipe(
        prompts, **kwargs, **(first_extra or {}), output_type="latent" if latent else "pil"
    ).images
    height, width = hires_size(first_pipe, o, kwargs["height"], kwargs["width"])
    if latent:
        image = upscale_latents(small, height, width, first_pipe.vae_scale_factor, o.hires_upscaler)
    else:
        image = [resize_image(picture, width, height, o.hires_upscaler) for picture in small]
    second = {**kwargs, "height": height, "width": width, "num_inference_steps": o.hires_steps or o.steps}
    second |= second_extra or {}
    if o.hires_negative:
        second["negative_prompt"] = [o.hires_negative] * len(prompts)
    again = [o.hires_prompt] * len(prompts) if o.hires_prompt else prompts
    return second_pipe(again, image=image, strength=o.hires_strength, **second).images
