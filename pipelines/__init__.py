"""diffusers-compatible pipelines, installed as gen.pipelines."""

from gen.pipelines.text_to_image import TextToImagePipeline

__all__ = ["TextToImagePipeline"]
