"""ControlNet preprocessors that need no weights: a picture in, the control image a ControlNet reads out.

Each is one function on an RGB uint8 array (H, W, 3), with A1111's sd-webui-controlnet module name and its two
numeric settings in that extension's terms (`threshold_a`, `threshold_b`: Canny's low and high thresholds, the
binarizing threshold, XDoG's, the tile down-sampling rate). The algorithms follow that extension's annotators
(written here with OpenCV and NumPy). Weight-based preprocessors (openpose, depth, ...) are not drawn here:
`detect` names what they would need instead of failing later.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Setting:
    name: str  # what it means for this module (A1111 shows it as the slider's label)
    default: float
    low: float
    high: float


@dataclass(frozen=True)
class Module:
    run: Callable[..., np.ndarray]  # (rgb, a, b, rng) -> (H, W, 3) uint8
    a: Setting | None = None
    b: Setting | None = None


# Need weights (lllyasviel's Annotators); named so a request for one gets a clear refusal, not "unknown"
NEEDS_WEIGHTS = (
    "openpose",
    "openpose_full",
    "depth_midas",
    "depth_zoe",
    "depth_leres",
    "normal_bae",
    "mlsd",
    "lineart_realistic",
    "lineart_anime",
    "softedge_hed",
    "softedge_pidinet",
    "seg_ofade20k",
)


def _cv2():
    import cv2  # here, not at import: `gen --help` stays light

    return cv2


def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2) if gray.ndim == 2 else gray


def canny(rgb: np.ndarray, a: float, b: float, rng) -> np.ndarray:
    return _rgb(_cv2().Canny(rgb, int(a), int(b)))


def invert(rgb: np.ndarray, a, b, rng) -> np.ndarray:
    """A drawing with black lines on white, as ControlNets want it: white lines on black."""
    return 255 - rgb


def threshold(rgb: np.ndarray, a: float, b, rng) -> np.ndarray:
    """White where every channel is above `a` (A1111's: the darkest channel decides), black elsewhere."""
    return _rgb(np.where(rgb.min(axis=2) > a, 255, 0).astype(np.uint8))


def binary(rgb: np.ndarray, a: float, b, rng) -> np.ndarray:
    """Dark strokes white on black; threshold `a` on the grey image (0 or 255: Otsu's choice)."""
    cv2 = _cv2()
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if a in (0, 255):
        _, out = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY_INV | cv2.THRESH_OTSU)
    else:
        _, out = cv2.threshold(gray, int(a), 255, cv2.THRESH_BINARY_INV)
    return _rgb(out)


def scribble_xdog(rgb: np.ndarray, a: float, b, rng) -> np.ndarray:
    """Scribble lines from a difference of Gaussians (sigma 0.5 and 5), kept where it exceeds `a`."""
    cv2 = _cv2()
    x = rgb.astype(np.float32)
    dog = (255 - np.min(cv2.GaussianBlur(x, (0, 0), 5.0) - cv2.GaussianBlur(x, (0, 0), 0.5), axis=2)).clip(
        0, 255
    )
    return _rgb(np.where(2 * (255 - dog) > a, 255, 0).astype(np.uint8))


def lineart_standard(rgb: np.ndarray, a, b, rng) -> np.ndarray:
    """Line art from how much darker each pixel is than its blurred surroundings (sigma 6), normalised by the
    median line strength."""
    cv2 = _cv2()
    x = rgb.astype(np.float32)
    intensity = np.min(cv2.GaussianBlur(x, (0, 0), 6.0) - x, axis=2).clip(0, 255)
    strong = intensity[intensity > 8]
    intensity = intensity / max(16.0, float(np.median(strong)) if strong.size else 16.0) * 127
    return _rgb(intensity.clip(0, 255).astype(np.uint8))


def tile_resample(rgb: np.ndarray, a: float, b, rng) -> np.ndarray:
    """The picture down-sampled by `a` (1: unchanged), for tile ControlNets that re-draw detail."""
    if a < 1.1:
        return rgb
    height, width = rgb.shape[:2]
    size = (max(1, int(width / a)), max(1, int(height / a)))
    return _cv2().resize(rgb, size, interpolation=_cv2().INTER_AREA)


def shuffle(rgb: np.ndarray, a, b, rng: np.random.Generator) -> np.ndarray:
    """The picture's content moved by a smooth random flow (the shuffle ControlNet's input); seeded."""
    cv2 = _cv2()
    height, width = rgb.shape[:2]
    flow_x = _noise_disk(height, width, 256, rng) * float(width - 1)
    flow_y = _noise_disk(height, width, 256, rng) * float(height - 1)
    return cv2.remap(rgb, flow_x, flow_y, cv2.INTER_LINEAR)


def _noise_disk(height: int, width: int, cell: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth noise in [0, 1]: uniform values on a coarse grid, cubic-interpolated."""
    cv2 = _cv2()
    coarse = rng.uniform(0, 1, size=(height // cell + 2, width // cell + 2)).astype(np.float32)
    noise = cv2.resize(coarse, (width + 2 * cell, height + 2 * cell), interpolation=cv2.INTER_CUBIC)
    noise = noise[cell : cell + height, cell : cell + width]
    noise = noise - noise.min()
    return (noise / max(float(noise.max()), 1e-8)).astype(np.float32)


MODULES: dict[str, Module] = {
    "none": Module(lambda rgb, a, b, rng: rgb),
    "canny": Module(canny, Setting("low threshold", 100, 1, 255), Setting("high threshold", 200, 1, 255)),
    "invert": Module(invert),
    "threshold": Module(threshold, Setting("threshold", 127, 0, 255)),
    "binary": Module(binary, Setting("threshold (0: Otsu)", 0, 0, 255)),
    "scribble_xdog": Module(scribble_xdog, Setting("XDoG threshold", 32, 1, 64)),
    "lineart_standard": Module(lineart_standard),
    "tile_resample": Module(tile_resample, Setting("down-sampling rate", 1.0, 1.0, 8.0)),
    "shuffle": Module(shuffle),
}
# A1111's labels for the same modules (its UI and module_list show these)
ALIASES = {
    "invert (from white bg & black line)": "invert",
    "lineart_standard (from white bg & black line)": "lineart_standard",
    "scribble_xdog": "scribble_xdog",
    "tile_resample": "tile_resample",
}


def module(name: str) -> Module:
    """The preprocessor named `name` (A1111's names and labels, any case); ValueError naming the choices."""
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key in MODULES:
        return MODULES[key]
    if key in NEEDS_WEIGHTS:
        raise ValueError(
            f"preprocessor {name!r} needs model weights (lllyasviel's Annotators), which gen does not download;"
            f" run it elsewhere and give its output as the control image with module 'none'. Without weights:"
            f" {', '.join(MODULES)}"
        )
    raise ValueError(f"unknown preprocessor {name!r}; choose one of {', '.join(MODULES)}")


def detect(
    image: Image.Image,
    name: str,
    threshold_a: float | None = None,
    threshold_b: float | None = None,
    resolution: int | None = None,
    seed: int = 0,
) -> Image.Image:
    """The control image of `image` by the preprocessor `name` (A1111's processor_res: `resolution` pixels on
    the short side first, as sd-webui-controlnet does; None: the picture's own size)."""
    m = module(name)
    a = _setting(m.a, threshold_a, name, "threshold_a")
    b = _setting(m.b, threshold_b, name, "threshold_b")
    rgb = np.asarray(_resized(image.convert("RGB"), resolution))
    out = m.run(np.ascontiguousarray(rgb), a, b, np.random.default_rng(seed))
    return Image.fromarray(out)


def _setting(setting: Setting | None, value: float | None, name: str, field: str) -> float | None:
    if setting is None or value is None:
        return None if setting is None else setting.default
    if not setting.low <= value <= setting.high:
        raise ValueError(
            f"{field} {value:g} for {name} ({setting.name}) must be between {setting.low:g} and {setting.high:g}"
        )
    return float(value)


def _resized(image: Image.Image, resolution: int | None) -> Image.Image:
    if resolution is None:
        return image
    if not 64 <= resolution <= 4096:
        raise ValueError(f"processor resolution {resolution} must be between 64 and 4096 pixels")
    scale = resolution / min(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.LANCZOS if scale < 1 else Image.BICUBIC)
