"""gen: a small, honest latent-diffusion toolkit.

Importing gen does no work: heavy modules (torch, diffusers) load on first use of a name below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "load_pipeline": "gen.weights",
    "generate": "gen.generation",
    "make_scheduler": "gen.samplers",
    "DiT": "gen.models.dit",
    "TextToImagePipeline": "gen.pipelines.text_to_image",
}
__all__ = ["DiT", "TextToImagePipeline", "__version__", "generate", "load_pipeline", "make_scheduler"]

if TYPE_CHECKING:
    from gen.generation import generate
    from gen.models.dit import DiT
    from gen.pipelines.text_to_image import TextToImagePipeline
    from gen.samplers import make_scheduler
    from gen.weights import load_pipeline


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gen' has no attribute {name!r}")
