"""Pixel helpers the library's callers share: pixels to the models' range (datasets, the judge), contact sheets
(the CLI's `--grid`, the trainer's validation samples, gen eval's grid)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (..., H, W, 3) -> float (..., 3, H, W) in [-1, 1], the range VAEs and the judge take."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor.normalize(pixels.movedim(-1, -3).float() / 255)


def contact_sheet(images: list, columns: int | None = None):
    """The images in rows of `columns` (default: all of them, at most 8), left to right, top to bottom; the
    last row's empty places are white."""
    from diffusers.utils import make_image_grid
    from PIL import Image

    columns = columns or min(len(images), 8)
    rows = -(-len(images) // columns)
    blank = Image.new("RGB", images[0].size, "white")  # make_image_grid wants exactly rows * columns images
    return make_image_grid([*images, *[blank] * (rows * columns - len(images))], rows, columns)
