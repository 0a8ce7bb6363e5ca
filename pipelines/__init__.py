"""diffusers-compatible pipelines, installed as gen.pipelines."""

from gen.pipelines.image_to_image import ImageToImagePipeline
from gen.pipelines.inpaint import InpaintPipeline
from gen.pipelines.text_to_image import TextToImagePipeline

__all__ = ["ImageToImagePipeline", "InpaintPipeline", "TextToImagePipeline"]
