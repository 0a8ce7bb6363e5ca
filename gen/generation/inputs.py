"""Init images and masks for image-to-image and inpainting, the same for every front-end: read (from files for
the CLI, decoded uploads for the server), checked, hashed for the PNG metadata, the mask inverted and blurred as
A1111 does, and the original pasted back outside the mask after inpainting.

PIL only (no torch): the CLI reads and checks these before it loads a model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from gen.generation.options import Options


@dataclass
class InitImages:
    """The picture to start from and, for inpainting, the mask (white = repaint), inverted and blurred as asked;
    the hashes identify the inputs as given (before inversion and blur)."""

    image: Image.Image  # RGB
    image_hash: str
    mask: Image.Image | None = None  # L, after --invert-mask and --mask-blur
    mask_hash: str | None = None

    def hashes(self) -> dict[str, str]:
        """What a PNG's JSON record says of its inputs (`gen reproduce` checks them)."""
        out = {"init_image_hash": self.image_hash}
        if self.mask_hash is not None:
            out["mask_hash"] = self.mask_hash
        return out


@dataclass
class ControlPictures:
    """The pictures of a request's ControlNet units, one per unit in order, as given (RGB); their hashes for the
    PNG metadata; the control images made from them per size (gen.generation.controlnets fills it)."""

    pictures: list[Image.Image]
    hashes: list[str]
    made: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {"control_image_hashes": list(self.hashes)}


def control_pictures(images: list[Image.Image]) -> ControlPictures:
    rgb = [as_rgb(image) for image in images]
    return ControlPictures(rgb, [pixel_hash(image) for image in rgb])


def read_control_pictures(units: list[dict]) -> ControlPictures | None:
    """The CLI's control images (each unit's `image` file); None without units."""
    if not units:
        return None
    return control_pictures(
        [read_image(u["image"], f"control image of unit {k}") for k, u in enumerate(units)]
    )


def pixel_hash(image: Image.Image) -> str:
    """SHA-256 of the decoded pixels (mode, size, bytes): the same picture in PNG, JPEG-free re-saves or an upload
    hashes the same, whatever its file's compression."""
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def read_image(path: str | Path, what: str = "init image") -> Image.Image:
    """An image file, fully decoded; ValueError naming the file if it is missing or not an image."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise ValueError(f"{what} {path}: no such file") from None
    except Image.DecompressionBombError as e:  # not an OSError: PIL's guard against decompression bombs
        raise ValueError(f"{what} {path}: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        reason = "not an image file PIL can read" if isinstance(e, UnidentifiedImageError) else str(e)
        raise ValueError(f"{what} {path}: {reason}") from None


def as_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels count as white, as most editors show them, not as whatever colour they hide.
        background = Image.new("RGBA", image.size, "white")
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def as_mask(image: Image.Image, name: str = "mask") -> Image.Image:
    """A single-channel mask: white = repaint. An RGBA mask's alpha is not used: its grey levels are."""
    try:
        return image.convert("L")
    except (ValueError, OSError) as e:
        raise ValueError(f"{name}: a {image.mode} image cannot be made a one-channel mask ({e})") from None


def init_images(
    image: Image.Image,
    mask: Image.Image | None = None,
    mask_blur: int = Options.mask_blur,
    invert_mask: bool = False,
) -> InitImages:
    """Check and prepare in-memory inputs (a mask must have the image's size; the blur, >= 0, is checked with
    the other options: gen.generation.options.check_init, the server's request models)."""
    rgb = as_rgb(image)
    if mask is None:
        return InitImages(rgb, pixel_hash(rgb))
    gray = as_mask(mask)
    if gray.size != rgb.size:
        raise ValueError(
            f"the mask is {gray.width}x{gray.height} but the init image is {rgb.width}x{rgb.height}; they must match"
        )
    prepared = ImageOps.invert(gray) if invert_mask else gray
    if mask_blur:
        prepared = prepared.filter(ImageFilter.GaussianBlur(mask_blur))
    return InitImages(rgb, pixel_hash(rgb), prepared, pixel_hash(gray))


def read_init_images(
    image: str | Path | None,
    mask: str | Path | None = None,
    mask_blur: int = Options.mask_blur,
    invert_mask: bool = False,
) -> InitImages | None:
    """The CLI's --init-image and --mask files (None without an init image; a mask alone is refused with the
    other options, gen.generation.options.check_init)."""
    if image is None:
        return None
    return init_images(
        read_image(image), None if mask is None else read_image(mask, "mask"), mask_blur, invert_mask
    )


def paste_back(init: InitImages, generated: Image.Image) -> Image.Image:
    """The original outside the mask, the generated image inside, blended along the blurred edge: A1111's
    overlay, as diffusers' VaeImageProcessor.apply_overlay (the inpaint pipeline's, for a crop) writes it. The VAE's
    round trip would otherwise change every unmasked pixel a little."""
    from diffusers.image_processor import VaeImageProcessor  # here: inputs are read before torch loads

    size = generated.size
    original = init.image if init.image.size == size else init.image.resize(size, Image.LANCZOS)
    mask = init.mask if init.mask.size == size else init.mask.resize(size, Image.LANCZOS)
    return VaeImageProcessor().apply_overlay(mask, original, generated)
