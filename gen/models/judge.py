"""The judge: a small CNN that names a shapes image's background, colour, shape, size and position.

Trained on rendered ground truth by the shapes recipe (gen.train.shapes) and shipped with the embedded model (its
judge/ folder; config.json names the class only, so the module path is not part of that format); its own accuracy
on clean, blurred and noisy renders is checked before `gen eval` (gen.evaluation) trusts its verdicts.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from gen.data import shapes as S
from gen.pixels import to_model_range

CLASSES = S.LABELS


class Judge(ModelMixin, ConfigMixin):
    """A small CNN with one classification head per attribute. Input (B, 3, H, W) in [-1, 1]."""

    @register_to_config
    def __init__(self, width: int = 32, hidden: int = 128, num_classes: dict | None = None):
        super().__init__()
        num_classes = num_classes or {k: len(v) for k, v in CLASSES.items()}
        w = width
        layers, ch = [], 3
        for out, stride in ((w, 1), (2 * w, 2), (4 * w, 2), (4 * w, 2), (4 * w, 2)):
            layers += [nn.Conv2d(ch, out, 3, stride, 1), nn.GroupNorm(8, out), nn.GELU()]
            ch = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten())  # (B, 4w*16)
        self.trunk = nn.Sequential(nn.Linear(ch * 16, hidden), nn.GELU())
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in num_classes.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(self.features(images))  # (B, hidden)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v.argmax(-1) for k, v in self(images.to(self.dtype)).items()}


def corrupt(images: torch.Tensor, kind: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Blur or noise renders the way generated images are imperfect; images (B, 3, H, W) in [-1, 1]."""
    if kind == "clean":
        return images
    if kind == "blur":
        k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
        k = (k[:, None] * k[None]) / 256
        k = k.to(images)[None, None].repeat(3, 1, 1, 1)  # (3, 1, 5, 5)
        return nn.functional.conv2d(nn.functional.pad(images, (2, 2, 2, 2), mode="replicate"), k, groups=3)
    if kind == "noise":
        return (images + 0.15 * torch.randn(images.shape, generator=generator).to(images)).clamp(-1, 1)
    raise ValueError(f"corruption {kind!r} must be 'clean', 'blur' or 'noise'")


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    return to_model_range(torch.from_numpy(np.asarray(images)))


def judge_accuracy(judge: Judge, count: int = 1000, seed: int = 777) -> dict[str, dict[str, float]]:
    """The judge's own accuracy per attribute on rendered ground truth, clean / blurred / noisy."""
    images, _, scenes = S.render_many(count, seed=seed, split="all")
    labels = {a: torch.tensor([s.labels()[a] for s in scenes]) for a in S.ATTRIBUTES}
    x = to_tensor(images)
    g = torch.Generator().manual_seed(seed)
    result = {}
    for kind in ("clean", "blur", "noise"):
        pred = judge.predict(corrupt(x, kind, g))
        result[kind] = {a: (pred[a].cpu() == labels[a]).float().mean().item() for a in S.ATTRIBUTES}
    return result
