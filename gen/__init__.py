"""gen: a small, honest latent-diffusion toolkit.

The map of the house, in its import layers from the top (README's Layout section has the long form; the layers
are pyproject.toml's [tool.importlinter] contract, checked by tests/test_layers.py):

    front-end        cli/ (the `gen` command: it starts the others)
    beside it        serve/ (`gen serve`: A1111's, OpenAI's and a jobs API, a page), tools/ (`gen bench`,
                     `gen eval --task img2img|inpaint`), gen.train (the one training loop and the scripts on it)
    library core     evaluation.py (`gen eval`: the judge's exam), generation/ (options -> images + metadata:
                     the core every front-end calls), loading/ (pipelines in: folders, single files, ControlNets),
                     gen.pipelines (diffusers-compatible pipelines, their checked loaders), models/ (the DiT, the
                     judge), diffusion/ (CFG, training targets, samplers), text/ (prompt -> embeddings), data/
                     (the shapes data, captions, image folders), files.py, pixels.py, control.py

Importing gen does no work: heavy modules (torch, diffusers) load on first use of a name below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "load_pipeline": "gen.loading.pipeline",
    "generate": "gen.generation",
    "make_scheduler": "gen.diffusion.samplers",
    "DiT": "gen.models.dit",
    "TextToImagePipeline": "gen.pipelines.text_to_image",
}
__all__ = ["DiT", "TextToImagePipeline", "__version__", "generate", "load_pipeline", "make_scheduler"]

if TYPE_CHECKING:
    from gen.diffusion.samplers import make_scheduler
    from gen.generation import generate
    from gen.loading.pipeline import load_pipeline
    from gen.models.dit import DiT
    from gen.pipelines.text_to_image import TextToImagePipeline


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gen' has no attribute {name!r}")
