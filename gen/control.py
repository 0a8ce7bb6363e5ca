"""ControlNet preprocessors: a picture in, the control image a ControlNet reads out.

Each is one function on an RGB uint8 array (H, W, 3), with A1111's sd-webui-controlnet module name and its two
numeric settings in that extension's terms (`threshold_a`, `threshold_b`: Canny's low and high thresholds, the
binarizing threshold, XDoG's, the tile down-sampling rate). Those that need no weights follow that extension's
annotators (written here with OpenCV and NumPy). The weight-based ones (openpose, depth, ...) run through the
controlnet-aux package (`pip install 'gen[annotators]'`) on lllyasviel's Annotators files in a local folder
($GEN_ANNOTATORS, default ~/.cache/gen/annotators): controlnet-aux's own from_pretrained would fetch them from the
hub, gen downloads nothing; without the package or the file, one line names both.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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


ANNOTATORS_ENV = "GEN_ANNOTATORS"
# Weight-based modules: A1111's name -> (controlnet-aux's detector class, the Annotators file it reads, its call's
# options); seg_ofade20k has no controlnet-aux detector and is refused by name
WEIGHTED = {
    "openpose": ("OpenposeDetector", "body_pose_model.pth", {"include_hand": False, "include_face": False}),
    "openpose_full": (
        "OpenposeDetector",
        "body_pose_model.pth",
        {"include_hand": True, "include_face": True},
    ),
    "depth_midas": ("MidasDetector", "dpt_hybrid-midas-501f0c75.pt", {}),
    "depth_zoe": ("ZoeDetector", "ZoeD_M12_N.pt", {}),
    "depth_leres": ("LeresDetector", "res101.pth", {}),
    "normal_bae": ("NormalBaeDetector", "scannet.pt", {}),
    "mlsd": ("MLSDdetector", "mlsd_large_512_fp32.pth", {}),
    "lineart_realistic": ("LineartDetector", "sk_model.pth", {"coarse": False}),
    "lineart_anime": ("LineartAnimeDetector", "netG.pth", {}),
    "softedge_hed": ("HEDdetector", "ControlNetHED.pth", {}),
    "softedge_pidinet": ("PidiNetDetector", "table5_pidinet.pth", {}),
}
NEEDS_WEIGHTS = (*WEIGHTED, "seg_ofade20k")


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
    """The preprocessor named `name` (A1111's names and labels, any case); ValueError naming the choices, or
    what a weight-based one needs."""
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key in MODULES:
        return MODULES[key]
    if key in WEIGHTED and _annotator_ready(key):
        return _weighted_module(key)
    if key in NEEDS_WEIGHTS:
        folder, file = annotators_dir(), WEIGHTED.get(key, ("", "its weights"))[1]
        raise ValueError(
            f"preprocessor {name!r} needs lllyasviel's Annotators weights ({file}) in {folder} (set"
            f" {ANNOTATORS_ENV} to another folder) and the controlnet-aux package (pip install"
            f" 'gen[annotators]'); gen downloads nothing. Or give its output as the control image with module"
            f" 'none'. Without weights: {', '.join(MODULES)}"
        )
    raise ValueError(f"unknown preprocessor {name!r}; choose one of {', '.join(MODULES)}")


def annotators_dir() -> Path:
    return Path(os.environ.get(ANNOTATORS_ENV) or Path.home() / ".cache" / "gen" / "annotators")


def available() -> list[str]:
    """Every module this machine can run: the weight-free ones, and the weight-based ones whose package and
    file are here."""
    return [*MODULES, *(name for name in WEIGHTED if _annotator_ready(name))]


def _annotator_ready(name: str) -> bool:
    return (
        importlib.util.find_spec("controlnet_aux") is not None
        and (annotators_dir() / WEIGHTED[name][1]).is_file()
    )


_MLSD = (Setting("value threshold", 0.1, 0.01, 2.0), Setting("distance threshold", 0.1, 0.01, 20.0))


def _weighted_module(name: str) -> Module:
    a, b = _MLSD if name == "mlsd" else (None, None)
    return Module(functools.partial(_run_annotator, name), a, b)


@functools.lru_cache(maxsize=4)
def _detector(cls_name: str, folder: str):
    """The detector from the local folder (controlnet-aux reads a folder's files under its default names)."""
    import controlnet_aux  # the optional extra, imported only when a weight-based module runs

    return getattr(controlnet_aux, cls_name).from_pretrained(folder)


def _run_annotator(name: str, rgb: np.ndarray, a, b, rng) -> np.ndarray:
    """controlnet-aux's detector on the picture at its size (detect has resized and padded it already)."""
    cls_name, _, options = WEIGHTED[name]
    detector = _detector(cls_name, str(annotators_dir()))
    side = min(rgb.shape[:2])
    extra = {"thr_v": a, "thr_d": b} if name == "mlsd" else {}
    out = detector(
        Image.fromarray(rgb),
        detect_resolution=side,
        image_resolution=side,
        output_type="np",
        **options,
        **extra,
    )
    return _rgb(np.asarray(out, dtype=np.uint8))


def detect(
    image: Image.Image,
    name: str,
    threshold_a: float | None = None,
    threshold_b: float | None = None,
    resolution: int | None = None,
    seed: int = 0,
) -> Image.Image:
    """The control image of `image` by the preprocessor `name`. `resolution` (A1111's processor_res): the picture
    resized to that many pixels on its short side and padded with its edge to a multiple of 64 while the module
    runs, as sd-webui-controlnet's resize_image_with_pad does (None: the picture's own size). "none" passes the
    picture through unchanged."""
    m = module(name)
    a = _setting(m.a, threshold_a, name, "threshold_a")
    b = _setting(m.b, threshold_b, name, "threshold_b")
    rgb = np.asarray(image.convert("RGB"))
    if m is MODULES["none"]:  # as the extension: no resize
        return Image.fromarray(rgb)
    padded, (height, width) = _with_pad(rgb, resolution)
    out = m.run(np.ascontiguousarray(padded), a, b, np.random.default_rng(seed))
    # the padding off again (at the output's scale: tile_resample returns a smaller picture)
    keep_h = round(height * out.shape[0] / padded.shape[0])
    keep_w = round(width * out.shape[1] / padded.shape[1])
    return Image.fromarray(np.ascontiguousarray(out[:keep_h, :keep_w]))


def _with_pad(rgb: np.ndarray, resolution: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    """(the picture at `resolution` on its short side, padded to multiples of 64 with its edge pixels), and its
    size before padding."""
    if resolution is None:
        return rgb, rgb.shape[:2]
    if not 64 <= resolution <= 4096:
        raise ValueError(f"processor resolution {resolution} must be between 64 and 4096 pixels")
    cv2 = _cv2()
    height, width = rgb.shape[:2]
    k = resolution / min(height, width)
    size = (max(1, round(width * k)), max(1, round(height * k)))
    resized = cv2.resize(rgb, size, interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    h, w = resized.shape[:2]
    pad = ((0, -h % 64), (0, -w % 64), (0, 0))
    return np.pad(resized, pad, mode="edge"), (h, w)


RESIZE_MODES = ("Crop and Resize", "Just Resize", "Resize and Fill")


def fit(image: Image.Image, width: int, height: int, resize_mode: str = "Crop and Resize") -> Image.Image:
    """A control image made the generation's size as sd-webui-controlnet does (detectmap_proc): "Just Resize"
    stretches, "Crop and Resize" covers and crops the middle, "Resize and Fill" fits inside and fills the rest
    with the median colour of the picture's border. Maps of few colours (2 < colours < 200: segmentation-like)
    resize with nearest neighbours, shrinking with area averaging, enlarging cubic."""
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {resize_mode!r} must be one of {list(RESIZE_MODES)}")
    rgb = np.asarray(image.convert("RGB"))
    h, w = rgb.shape[:2]
    if resize_mode == "Just Resize":
        return Image.fromarray(_resize(rgb, width, height))
    k = (max if resize_mode == "Crop and Resize" else min)(height / h, width / w)
    new_w, new_h = max(1, round(w * k)), max(1, round(h * k))
    resized = _resize(rgb, new_w, new_h)
    if resize_mode == "Crop and Resize":
        top, left = (new_h - height) // 2, (new_w - width) // 2
        return Image.fromarray(np.ascontiguousarray(resized[top : top + height, left : left + width]))
    borders = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]], axis=0)
    out = np.empty((height, width, 3), np.uint8)
    out[:] = np.median(borders, axis=0).astype(np.uint8)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return Image.fromarray(out)


def _resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    cv2 = _cv2()
    if (width, height) == (rgb.shape[1], rgb.shape[0]):
        return rgb
    colours = len(np.unique(rgb.reshape(-1, 3), axis=0))
    if 2 < colours < 200:
        interpolation = cv2.INTER_NEAREST
    elif width * height < rgb.shape[0] * rgb.shape[1]:
        interpolation = cv2.INTER_AREA
    else:
        interpolation = cv2.INTER_CUBIC
    return cv2.resize(rgb, (width, height), interpolation=interpolation)


def pixel_perfect(width: int, height: int, raw_width: int, raw_height: int, resize_mode: str) -> int:
    """A1111's Pixel Perfect: the processor resolution at which the detected map needs no further resize."""
    k0, k1 = height / raw_height, width / raw_width
    k = min(k0, k1) if resize_mode == "Resize and Fill" else max(k0, k1)
    return int(np.round(k * min(raw_height, raw_width)))


def check_settings(name: str, threshold_a: float | None, threshold_b: float | None) -> None:
    """The module exists and its two settings, where it has them, are within its ranges (ValueError naming
    them); a setting the module lacks is ignored, as sd-webui-controlnet does."""
    m = module(name)
    _setting(m.a, threshold_a, name, "threshold_a")
    _setting(m.b, threshold_b, name, "threshold_b")


def _setting(setting: Setting | None, value: float | None, name: str, field: str) -> float | None:
    if setting is None or value is None:
        return None if setting is None else setting.default
    if not setting.low <= value <= setting.high:
        raise ValueError(
            f"{field} {value:g} for {name} ({setting.name}) must be between {setting.low:g} and {setting.high:g}"
        )
    return float(value)
