"""What a shapes scene is, and how it is drawn: the world of the shapes data (gen.data.shapes).

Every image holds one shape of one colour on a plain background of another colour, at one of two sizes and five
positions. Images are drawn with PIL at 4x resolution and downsampled (anti-aliased). A fixed list of (colour,
shape, background) combinations is held out of training to measure compositional generalisation: every colour and
shape still appears in training, only those pairings do not.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
# Drawn by the same code but never in base training: material for teaching the model a new shape (DreamBooth).
EXTRA_SHAPES = ("heart", "ring")
SIZES = ("small", "large")
POSITIONS = ("centre", "top left", "top right", "bottom left", "bottom right")
ATTRIBUTES = ("background", "colour", "shape", "size", "position")
# The class names of each attribute, in label order (the judge's heads and Scene.labels).
LABELS: dict[str, list[str]] = {
    "background": list(COLOURS),
    "colour": list(COLOURS),
    "shape": list(SHAPES + EXTRA_SHAPES),
    "size": list(SIZES),
    "position": list(POSITIONS),
}

_RADIUS = {"small": 0.15, "large": 0.27}  # fraction of the image side
_CORNER_MARGIN = 0.06


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str
    size: str
    position: str

    def labels(self) -> dict[str, int]:
        """Class indices per attribute, for the judge."""
        return {a: LABELS[a].index(getattr(self, a)) for a in ATTRIBUTES}


def _held_out() -> frozenset[tuple[str, str, str]]:
    # A fixed seeded pick of 20 (colour, shape, background) triples, one per (colour, shape) row at most.
    rng = random.Random(1234)
    triples = [(c, s, b) for c in COLOURS for s in SHAPES for b in COLOURS if b != c]
    rng.shuffle(triples)
    chosen: list[tuple[str, str, str]] = []
    for c, s, b in triples:
        if len(chosen) < 20 and all((c, s) != (x[0], x[1]) for x in chosen):
            chosen.append((c, s, b))
    return frozenset(chosen)


HELD_OUT = _held_out()


def is_held_out(scene: Scene) -> bool:
    return (scene.colour, scene.shape, scene.background) in HELD_OUT


def sample_scene(rng: random.Random, split: str = "train", shapes: tuple[str, ...] = SHAPES) -> Scene:
    """A random scene; split "train" avoids HELD_OUT, "heldout" draws only from it, "all" from everything."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split={split!r} must be 'train', 'heldout' or 'all'")
    while True:
        if split == "heldout":
            colour, shape, background = rng.choice(sorted(HELD_OUT))
        else:
            colour, shape = rng.choice(list(COLOURS)), rng.choice(shapes)
            background = rng.choice([c for c in COLOURS if c != colour])
        scene = Scene(colour, shape, background, rng.choice(SIZES), rng.choice(POSITIONS))
        if split != "train" or not is_held_out(scene):
            return scene


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        # Equilateral, pointing up, centred on its centroid.
        return [
            (cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        ]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if shape == "heart":
        pts = []
        for k in range(64):
            t = 2 * math.pi * k / 64
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + r * x / 16, cy - r * (y + 2) / 16))
        return pts
    raise ValueError(f"no polygon for shape {shape!r}")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = r * 0.85  # a square of the same visual weight as the circle
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "cross":
        w = r * 0.32
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(1, round(r * 0.38)))
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill)


def _centre(position: str, r: float) -> tuple[float, float]:
    """The shape's centre as fractions of the side, for a shape of radius r."""
    corner = r + _CORNER_MARGIN
    fx = {"centre": 0.5, "top left": corner, "bottom left": corner}.get(position, 1 - corner)
    fy = {"centre": 0.5, "top left": corner, "top right": corner}.get(position, 1 - corner)
    return fx, fy


def object_box(scene: Scene, resolution: int = 64, pad: float = 0.05) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) pixels of the square any shape of the scene's size and position fits in (render's
    jitter included), grown by `pad` of the side: where an inpainting mask covers the object."""
    r = _RADIUS[scene.size] * 1.1 + 0.025 + pad
    fx, fy = _centre(scene.position, _RADIUS[scene.size])
    box = (fx - r, fy - r, fx + r, fy + r)
    return tuple(min(resolution, max(0, round(v * resolution))) for v in box)


def render(
    scene: Scene, resolution: int = 64, jitter: random.Random | None = None, supersample: int = 4
) -> Image.Image:
    """Draw a scene. `jitter` (an rng) moves and scales the shape slightly, for training variety."""
    side = resolution * supersample
    r = _RADIUS[scene.size]
    dx = dy = 0.0
    if jitter is not None:
        r *= jitter.uniform(0.9, 1.1)
        dx, dy = jitter.uniform(-0.025, 0.025), jitter.uniform(-0.025, 0.025)
    fx, fy = _centre(scene.position, r)
    image = Image.new("RGB", (side, side), COLOURS[scene.background])
    _draw_shape(
        ImageDraw.Draw(image),
        scene.shape,
        cx=(fx + dx) * side,
        cy=(fy + dy) * side,
        r=r * side,
        fill=COLOURS[scene.colour],
    )
    return image.resize((resolution, resolution), Image.Resampling.BOX)
