"""Upscalers by A1111's names, and the sizes of hires fix: torch-free (the request's checks and the server's
upscaler list run before torch loads); the latent modes' tensor work is gen.generation.hires.

A1111's "Latent" modes resize the denoiser's latents with torch's interpolate; "None", "Lanczos" and "Nearest"
resize the decoded picture (A1111's "None" upscaler leaves the picture as it is and its resize step then uses
Lanczos, so "None" and "Lanczos" give the same pixels here, as there).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

# name -> (torch.nn.functional.interpolate mode, antialias), as A1111's shared.latent_upscale_modes
LATENT_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
PIXEL_FILTERS = {"None": "LANCZOS", "Lanczos": "LANCZOS", "Nearest": "NEAREST"}  # name -> PIL's filter
UPSCALERS = (*LATENT_MODES, *PIXEL_FILTERS)


def check_upscaler(name: str, allowed: tuple[str, ...] = UPSCALERS) -> None:
    if name not in allowed:
        raise ValueError(f"upscaler {name!r} is not one of: {', '.join(allowed)}")


def target_size(
    width: int, height: int, scale: float | None, to_width: int | None, to_height: int | None, stride: int
) -> tuple[int, int]:
    """(width, height) after upscaling a width x height picture, as A1111's hires fix computes it: by `scale`,
    or to `to_width` x `to_height` (one of them alone keeps the aspect ratio), rounded down to the model's stride
    (A1111 rounds to its latent factor, 8)."""
    if to_width is None and to_height is None:
        w, h = int(width * (scale or 1.0)), int(height * (scale or 1.0))
    elif to_height is None:
        w, h = to_width, to_width * height // width
    elif to_width is None:
        w, h = to_height * width // height, to_height
    else:
        w, h = to_width, to_height
    return max(stride, w // stride * stride), max(stride, h // stride * stride)


def cover(width: int, height: int, to_width: int, to_height: int) -> tuple[int, int]:
    """The size a width x height picture is resized to so it covers to_width x to_height with its aspect ratio
    kept (the excess is cropped from the middle, as A1111's "crop and resize")."""
    ratio = max(to_width / width, to_height / height)
    return max(to_width, round(width * ratio)), max(to_height, round(height * ratio))


def crop_box(width: int, height: int, to_width: int, to_height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred to_width x to_height part of a width x height picture."""
    left, top = (width - to_width) // 2, (height - to_height) // 2
    return left, top, left + to_width, top + to_height


def resize_image(image: Image.Image, width: int, height: int, upscaler: str = "Lanczos") -> Image.Image:
    """A picture resized to width x height with a pixel upscaler, covering and centre-cropping where the aspect
    ratio changes; also `POST /sdapi/v1/extra-single-image`."""
    from PIL import Image  # here: the request's checks import this module before anything heavy

    check_upscaler(upscaler, tuple(PIXEL_FILTERS))
    w, h = cover(image.width, image.height, width, height)
    resized = image.resize((w, h), resample=getattr(Image.Resampling, PIXEL_FILTERS[upscaler]))
    return resized if (w, h) == (width, height) else resized.crop(crop_box(w, h, width, height))
