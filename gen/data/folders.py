"""Image-caption folders: the data users fine-tune on.

A folder of images, each captioned by a `.txt` file of the same stem or by a `metadata.jsonl` line
({"file_name": ..., "text": ...}). Images that cannot be read are skipped with a warning naming them. Images are
resized (shorter side), centre-cropped to a square and optionally flipped.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from gen.pixels import to_model_range

logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _captions(folder: Path) -> dict[str, str]:
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        return {}
    out = {}
    for number, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out[row["file_name"]] = row["text"]
        except (ValueError, KeyError):
            raise ValueError(f'{meta}:{number}: expected {{"file_name": ..., "text": ...}}') from None
    return out


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False


class ImageCaptionFolder:
    """A map dataset: {"pixel_values": (3, R, R) in [-1, 1], "caption": str}."""

    def __init__(
        self,
        folder: str | Path,
        resolution: int = 64,
        flip: bool = False,
        caption: str | None = None,
        fallback_caption: str = "",
    ):
        """`caption` captions every image; `fallback_caption` only those without a caption of their own."""
        self.folder, self.resolution, self.flip = Path(folder), resolution, flip
        if not self.folder.is_dir():
            raise FileNotFoundError(f"data folder {str(self.folder)!r} does not exist")
        meta = _captions(self.folder)
        self.items: list[tuple[Path, str]] = []
        skipped = []
        for path in sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            if not _readable(path):
                skipped.append(path.name)
                continue
            text = caption if caption is not None else meta.get(path.name)
            if text is None and path.with_suffix(".txt").is_file():
                text = path.with_suffix(".txt").read_text(encoding="utf-8-sig").strip()
            self.items.append((path, text or fallback_caption))
        if skipped:
            logger.warning(
                "skipped %d unreadable image(s) in %s: %s", len(skipped), self.folder, ", ".join(skipped)
            )
        if not self.items:
            raise ValueError(f"{self.folder} has no readable images ({', '.join(IMAGE_SUFFIXES)})")

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int, rng: random.Random | None = None, flip: bool | None = None) -> dict:
        """One example; `flip` mirrors it, or (flip=None) a coin from `rng` decides when the folder flips."""
        path, text = self.items[index]
        with Image.open(path) as raw:
            image = raw.convert("RGB")
        r = self.resolution
        scale = r / min(image.size)
        image = image.resize(
            (max(r, round(image.width * scale)), max(r, round(image.height * scale))),
            Image.Resampling.BICUBIC,
        )
        left, top = (image.width - r) // 2, (image.height - r) // 2
        image = image.crop((left, top, left + r, top + r))
        if flip is None:
            flip = self.flip and rng is not None and rng.random() < 0.5
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = to_model_range(torch.from_numpy(np.array(image)))  # (3, R, R)
        return {"pixel_values": pixels, "caption": text}

    __getitem__ = load
