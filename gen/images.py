"""Image helpers the library's callers share (the CLI's `--grid`, the trainer's validation samples)."""

from __future__ import annotations


def contact_sheet(images: list, columns: int | None = None):
    """The images in rows of `columns` (default: all of them, at most 8), left to right, top to bottom; the
    last row's empty places are white."""
    from diffusers.utils import make_image_grid
    from PIL import Image

    columns = columns or min(len(images), 8)
    rows = -(-len(images) // columns)
    blank = Image.new("RGB", images[0].size, "white")  # make_image_grid wants exactly rows * columns images
    return make_image_grid([*images, *[blank] * (rows * columns - len(images))], rows, columns)
