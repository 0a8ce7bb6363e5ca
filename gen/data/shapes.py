"""Procedurally drawn coloured shapes with captions: the embedded model's training data and its exam.

A scene (gen.data.scenes: one shape of one colour on a plain background of another, at one of two sizes and five
positions, some combinations held out of training) drawn and captioned (gen.data.captions), deterministically
from (seed, index). The scenes' names are re-exported, so `shapes.Scene`, `shapes.render` read as before.
"""

from __future__ import annotations

import random
from dataclasses import asdict

import numpy as np
import torch

from gen.data.captions import caption
from gen.data.scenes import (  # noqa: F401  (re-exported: the shapes data in one namespace)
    ATTRIBUTES,
    COLOURS,
    EXTRA_SHAPES,
    HELD_OUT,
    LABELS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    is_held_out,
    object_box,
    render,
    sample_scene,
)
from gen.pixels import to_model_range


def example(
    index: int, seed: int = 0, split: str = "train", resolution: int = 64, shapes=SHAPES
) -> tuple[np.ndarray, str, Scene]:
    """Image (H, W, 3) uint8, caption and scene for one index, the same on every machine."""
    rng = random.Random(seed * 1_000_003 + index)
    scene = sample_scene(rng, split, shapes)
    image = render(scene, resolution, jitter=rng)
    return np.array(image), caption(scene, rng), scene


def render_many(
    count: int, seed: int = 0, split: str = "train", resolution: int = 64, shapes=SHAPES, workers: int = 1
):
    """(N, H, W, 3) uint8 images, captions and scenes for indices 0..count-1; `workers` processes in parallel."""
    args = [(i, seed, split, resolution, shapes) for i in range(count)]
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            rows = pool.starmap(example, args, chunksize=256)
    else:
        rows = [example(*a) for a in args]
    images = np.stack([r[0] for r in rows])
    return images, [r[1] for r in rows], [r[2] for r in rows]


class ShapesDataset:
    """A torch-style map dataset: {"pixel_values": (3, H, W) float in [-1, 1], "caption": str, "labels": dict}."""

    def __init__(self, size: int, seed: int = 0, split: str = "train", resolution: int = 64, shapes=SHAPES):
        self.size, self.seed, self.split, self.resolution, self.shapes = (
            size,
            seed,
            split,
            resolution,
            tuple(shapes),
        )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} examples")
        image, text, scene = example(
            index, seed=self.seed, split=self.split, resolution=self.resolution, shapes=self.shapes
        )
        pixels = to_model_range(torch.from_numpy(image))  # (3, H, W)
        return {"pixel_values": pixels, "caption": text, "labels": scene.labels(), "scene": asdict(scene)}
