"""Image and mask inputs of the image-to-image and inpainting pipelines: what diffusers accepts (PIL images,
numpy arrays, tensors, or lists of them; masks white = repaint), checked with one clear line each, sized for
the denoiser, and VAE-encoded with one generator per image; and the latent scaling between the VAE and the
denoiser (scale_latents, unscale_latents).

Conversion itself is diffusers' VaeImageProcessor; this module adds the checks it lacks (it resizes a mask of
another size silently, and misreads a uint8 array as [0, 255] floats) and the per-image encoding that keeps
an image independent of its batch-mates.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

KINDS = (PIL.Image.Image, np.ndarray, torch.Tensor)
MASK_SHAPES = "(H, W), (H, W, 1) or (B, H, W, 1) for numpy; (H, W), (1, H, W) or (B, 1, H, W) for tensors"


def _items(x) -> list:
    return list(x) if isinstance(x, list) else [x]


def check_image(image: Any, name: str = "image") -> None:
    """A PIL image, an array or tensor, or a non-empty list of one kind of them."""
    items = _items(image)
    if image is None or not items or not all(isinstance(i, KINDS) for i in items):
        kind = type(items[0] if items else image).__name__
        raise ValueError(
            f"{name} must be a PIL image, a numpy array or a torch tensor (or a list of them), got {kind}"
        )
    if len({type(i) for i in items}) > 1:
        raise ValueError(f"{name}: a list of images must be of one kind (PIL, numpy or tensor)")


def pixel_size(image: Any, latent_channels: int = 4) -> tuple[int, int] | None:
    """(width, height) of an image input in pixels; None for latents given in its place."""
    first = _items(image)[0]
    if isinstance(first, PIL.Image.Image):
        return first.size
    shape = tuple(first.shape)
    if isinstance(first, torch.Tensor):
        if len(shape) >= 3 and shape[-3] == latent_channels:
            return None
        return shape[-1], shape[-2]
    if len(shape) == 2:  # numpy (H, W)
        return shape[1], shape[0]
    return shape[-2], shape[-3]  # numpy (..., H, W, C)


def check_mask(mask: Any, image: Any, latent_channels: int = 4) -> None:
    """A mask of one channel (white = repaint) and the image's size."""
    check_image(mask, "mask_image")
    for m in _items(mask):
        if isinstance(m, PIL.Image.Image):
            continue
        shape, ok = tuple(m.shape), False
        if isinstance(m, np.ndarray):
            ok = len(shape) == 2 or (len(shape) in (3, 4) and shape[-1] == 1)
        else:
            ok = len(shape) == 2 or (len(shape) in (3, 4) and shape[-3] == 1)
        if not ok:
            raise ValueError(f"mask_image has shape {shape}: a mask has one channel, {MASK_SHAPES}")
    size, want = _mask_size(_items(mask)[0]), pixel_size(image, latent_channels)
    if want is not None and size != want:
        raise ValueError(
            f"mask_image is {size[0]}x{size[1]} but image is {want[0]}x{want[1]}: give a mask of the image's size"
        )


def _mask_size(m) -> tuple[int, int]:
    if isinstance(m, PIL.Image.Image):
        return m.size
    shape = tuple(m.shape)
    if isinstance(m, np.ndarray) and len(shape) >= 3:
        return shape[-2], shape[-3]
    return shape[-1], shape[-2]


def as_float(image: Any) -> Any:
    """uint8 arrays as floats in [0, 1], which is what VaeImageProcessor expects of numpy input."""
    items = [
        i.astype(np.float32) / 255 if isinstance(i, np.ndarray) and i.dtype == np.uint8 else i
        for i in _items(image)
    ]
    return items if isinstance(image, list) else items[0]


def check_crop(padding: int | None, image: Any, mask: Any, output_type: str) -> None:
    """padding_mask_crop's terms, as diffusers' inpainting pipelines take it: pixels >= 0 around the mask, one
    PIL image and mask (the crop is cut from and pasted back into that image), PIL output."""
    if padding is None:
        return
    if not isinstance(padding, int) or isinstance(padding, bool) or padding < 0:
        raise ValueError(f"padding_mask_crop={padding!r} must be an integer >= 0 (pixels around the mask)")
    if not isinstance(image, PIL.Image.Image) or not isinstance(mask, PIL.Image.Image):
        raise ValueError("padding_mask_crop needs image and mask_image as single PIL images")
    if output_type != "pil":
        raise ValueError(f"padding_mask_crop needs output_type='pil', got {output_type!r}")


def as_mask(mask: Any) -> Any:
    """A 2-D tensor mask as (1, H, W), the grayscale shape VaeImageProcessor reads."""
    items = [m[None] if isinstance(m, torch.Tensor) and m.ndim == 2 else m for m in _items(as_float(mask))]
    return items if isinstance(mask, list) else items[0]


def processors(stride: int) -> tuple[VaeImageProcessor, VaeImageProcessor]:
    """diffusers' image processor and its inpainting mask processor (grayscale, binarized at 0.5), at the
    pipeline's stride (VAE factor x patch size), so default sizes are ones the denoiser takes."""
    image = VaeImageProcessor(vae_scale_factor=stride)
    mask = VaeImageProcessor(
        vae_scale_factor=stride, do_normalize=False, do_binarize=True, do_convert_grayscale=True
    )
    return image, mask


def expand(x: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """k images (or masks) for a batch of `batch` rows, prompt by prompt: image i goes with prompt i.

    (diffusers' SD pipelines tile instead, image i with row i mod k, which pairs an image with another prompt
    when several prompts each make several images; with one image, the common case, both agree.)"""
    k = x.shape[0]
    if batch % k:
        raise ValueError(
            f"got {k} {what}s for {batch} images (prompts x num_images_per_prompt); give 1 or one per prompt"
        )
    return x.repeat_interleave(batch // k, dim=0)


def encode(vae, pixels: torch.Tensor, generator, batch: int) -> torch.Tensor:
    """VAE latents of `pixels` (k, 3, H, W) in [-1, 1] for `batch` rows, sampled from the VAE's posterior as
    diffusers' pipelines do. Latents given in place of pixels (k, latent channels, h, w) pass through.

    With a list of generators, row i is encoded with generator i (as diffusers' img2img does), so an image
    does not depend on its batch; with one generator the k images are encoded once, as diffusers does."""
    if pixels.shape[1] == vae.config.latent_channels:
        return expand(pixels, batch, "image")
    if isinstance(generator, list):
        pixels = expand(pixels, batch, "image")
        rows = [retrieve_latents(vae.encode(pixels[i : i + 1]), generator=generator[i]) for i in range(batch)]
        return scale_latents(vae, torch.cat(rows))
    latents = scale_latents(vae, retrieve_latents(vae.encode(pixels), generator=generator))
    return expand(latents, batch, "image")


# The latent space as the denoiser sees it, both ways: one formula each, for every pipeline and the trainer.


def scale_latents(vae, x: torch.Tensor) -> torch.Tensor:
    """A VAE posterior's latents (B, C, h, w) -> the denoiser's: times `scaling_factor`, after the per-channel
    `latents_mean` / `latents_std` normalisation where the VAE's config has them (as diffusers' SDXL pipelines
    encode), or minus `shift_factor` where it has that (SD3's and Flux's VAEs). unscale_latents undoes it."""
    stats = _channel_stats(vae, x)
    if stats is not None:
        mean, std = stats
        return (x - mean) * vae.config.scaling_factor / std
    return (x - _shift(vae)) * vae.config.scaling_factor


def unscale_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """The denoiser's latents (B, C, h, w) -> the VAE decoder's: scale_latents undone."""
    x = latents / vae.config.scaling_factor
    stats = _channel_stats(vae, x)
    if stats is None:
        return x + _shift(vae)
    mean, std = stats
    return x * std + mean


def _shift(vae) -> float:
    """The VAE's latent shift (SD3, Flux), 0 where its config has none (SD's: None)."""
    return getattr(vae.config, "shift_factor", None) or 0.0


def _channel_stats(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The VAE's per-channel (latents_mean, latents_std) as (1, C, 1, 1) tensors of x's dtype and device; None
    where its config lacks either (SD's VAEs: scaling_factor alone)."""
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None
    shape = (1, len(mean), 1, 1)
    return torch.tensor(mean).view(shape).to(x), torch.tensor(std).view(shape).to(x)


def fit_size(pipe, image, height: int | None, width: int | None) -> tuple[int, int]:
    """(height, width) for `pipe` (its vae, vae_scale_factor and latent_stride) from an init image: as given, else
    the image's own, rounded down to a multiple of the stride."""
    size = pixel_size(image, pipe.vae.config.latent_channels)
    if size is None:  # latents given as the image
        first = image[0] if isinstance(image, list) else image
        size = (first.shape[-1] * pipe.vae_scale_factor, first.shape[-2] * pipe.vae_scale_factor)
    stride = pipe.latent_stride
    if (not height and size[1] < stride) or (not width and size[0] < stride):
        raise ValueError(
            f"the image is {size[0]}x{size[1]}, smaller than this model's stride of {stride} pixels; give an"
            f" image of at least {stride}x{stride}, or the size (height, width)"
        )
    return height or size[1] // stride * stride, width or size[0] // stride * stride
