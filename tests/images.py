"""The one way tests compare pictures.

gen's promise (README, "Seeds you can reproduce"): one image made alone -- a CLI run, one served request with no
batch-mates, `gen reproduce` -- is the same image bit for bit wherever the same settings run on the same machine;
an image made beside others (another batch size, batch-mates, process count) is within PIXEL_TOLERANCE (one
level of 255) on a few pixels, because the CPU's matrix kernels may pick their blocking by the batch's shape and
the thread count (seen on Intel AVX-512/AMX CPUs; bit-identical on the AMD AVX2 and AVX-512 machines measured).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from gen.generation.metadata import PIXEL_TOLERANCE

MOVED_PIXELS = 1e-3  # at most this share of the values may differ at all when images are within tolerance


def pixels(image) -> np.ndarray:
    """RGB levels (H, W, 3) of a path, a PIL image or an array (floats in [0, 1], as output_type="np", are
    rounded to the 0-255 levels a PNG would hold)."""
    if isinstance(image, np.ndarray):
        if np.issubdtype(image.dtype, np.floating):
            return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
        return image
    if isinstance(image, (str, Path)):
        image = Image.open(image)
    return np.asarray(image.convert("RGB"))


def assert_same_image(a, b, exact: bool = False) -> None:
    """`a` and `b` are one image: equal when `exact` (both made alone), else within PIXEL_TOLERANCE."""
    a, b = pixels(a), pixels(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    if exact:
        assert diff.max() == 0, f"not bit-identical: max difference {diff.max()} on {(diff > 0).mean():.4%}"
        return
    assert diff.max() <= PIXEL_TOLERANCE and (diff > 0).mean() < MOVED_PIXELS, (
        f"max difference {diff.max()} (tolerance {PIXEL_TOLERANCE}) on {(diff > 0).mean():.4%} of values"
    )


def differ(a, b) -> bool:
    """Clearly different pictures (beyond what kernels' rounding could make): for 'this option changed it'."""
    diff = np.abs(pixels(a).astype(np.int16) - pixels(b).astype(np.int16))
    return bool(diff.max() > PIXEL_TOLERANCE or (diff > 0).mean() >= MOVED_PIXELS)
