"""diffusers-compatible pipelines, installed as gen.pipelines.

The pipeline classes load on first use, so the torch-free rules in gen.pipelines.checks can be imported by the
option checks that run before anything heavy loads (`gen --help`, argument errors).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_MODULES = {
    "ControlNetImageToImagePipeline": "gen.pipelines.controlnet",
    "ControlNetPipeline": "gen.pipelines.controlnet",
    "FluxImageToImagePipeline": "gen.pipelines.flow_image_to_image",
    "FluxInpaintPipeline": "gen.pipelines.flow_inpaint",
    "FluxTextToImagePipeline": "gen.pipelines.flux",
    "ImageToImagePipeline": "gen.pipelines.image_to_image",
    "InpaintPipeline": "gen.pipelines.inpaint",
    "SD3ImageToImagePipeline": "gen.pipelines.flow_image_to_image",
    "SD3InpaintPipeline": "gen.pipelines.flow_inpaint",
    "SD3TextToImagePipeline": "gen.pipelines.sd3",
    "TextToImagePipeline": "gen.pipelines.text_to_image",
}
__all__ = [
    "ControlNetImageToImagePipeline",
    "ControlNetPipeline",
    "FluxImageToImagePipeline",
    "FluxInpaintPipeline",
    "FluxTextToImagePipeline",
    "ImageToImagePipeline",
    "InpaintPipeline",
    "SD3ImageToImagePipeline",
    "SD3InpaintPipeline",
    "SD3TextToImagePipeline",
    "TextToImagePipeline",
]

if TYPE_CHECKING:
    from gen.pipelines.controlnet import ControlNetImageToImagePipeline, ControlNetPipeline
    from gen.pipelines.flow_image_to_image import FluxImageToImagePipeline, SD3ImageToImagePipeline
    from gen.pipelines.flow_inpaint import FluxInpaintPipeline, SD3InpaintPipeline
    from gen.pipelines.flux import FluxTextToImagePipeline
    from gen.pipelines.image_to_image import ImageToImagePipeline
    from gen.pipelines.inpaint import InpaintPipeline
    from gen.pipelines.sd3 import SD3TextToImagePipeline
    from gen.pipelines.text_to_image import TextToImagePipeline


def __getattr__(name: str):
    if name in _MODULES:
        return getattr(importlib.import_module(_MODULES[name]), name)
    raise AttributeError(f"module 'gen.pipelines' has no attribute {name!r}")
