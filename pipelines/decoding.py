"""Latents out as pictures: the VAE decode (fp16 VAEs in fp32, NaN retried in fp32, then a one-line error), the
post-processing and the pipeline output every task's call returns."""

from __future__ import annotations

import logging

import torch
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from gen.pipelines.images import unscale_latents

logger = logging.getLogger(__name__)

GUIDANCE_USUAL = 30.0  # A1111's CFG slider ends here; far above it the latents overflow


class NotFiniteError(ValueError, FloatingPointError):
    """A generated picture with NaN or infinite values: a ValueError, since a request's settings (a huge guidance
    scale) cause it as often as broken weights, so front-ends answer it as bad input, in one line."""


class DecodingMixin:
    """Decoding for a pipeline with a `vae` and an `image_processor` (see LatentDiffusionPipeline)."""

    def _finish(self, latents: torch.Tensor, generator, output_type: str, return_dict: bool, overlay=None):
        """Decode (unless output_type="latent"), post-process, free offload hooks, and wrap the result.
        `overlay` (images -> images) runs on the post-processed images (the inpaint crop's paste-back)."""
        if output_type == "latent":
            image = latents
        else:
            image = self.image_processor.postprocess(
                self.decode_latents(latents, generator), output_type=output_type
            )
            if overlay is not None:
                image = overlay(image)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    def decode_latents(self, latents: torch.Tensor, generator=None) -> torch.Tensor:
        """Latents -> images in [-1, 1]. fp16 VAEs decode in fp32 (they overflow); NaN output is an error."""
        vae = self.vae
        x = unscale_latents(vae, latents)  # (B, C, h, w), as the VAE decoder reads them
        dtype = vae.dtype
        if dtype == torch.float16 and getattr(vae.config, "force_upcast", True):
            dtype = torch.float32
        if not torch.isfinite(x).all():
            raise self._not_finite("the denoised latents contain NaN or infinite values", dtype)
        image = self._vae_decode(x, dtype, generator)
        if not torch.isfinite(image).all() and dtype != torch.float32:
            logger.warning("VAE decode in %s gave NaN; retrying in float32", dtype)
            image = self._vae_decode(x, torch.float32, generator)
        if not torch.isfinite(image).all():
            raise self._not_finite("the decoded image contains NaN or infinite values", torch.float32)
        return image

    def _not_finite(self, what: str, dtype: torch.dtype) -> NotFiniteError:
        """The error for a picture that is not finite, naming the likeliest cause: a guidance scale far beyond the
        usual range (finite, yet it overflows the latents), else the weights or the precision."""
        scale = getattr(self, "_guidance_scale", None)
        if scale is not None and abs(scale) > GUIDANCE_USUAL:
            return NotFiniteError(
                f"{what}: guidance_scale {scale:g} is far beyond the usual 1-{GUIDANCE_USUAL:g}"
            )
        hint = "" if dtype == torch.float32 else "try float32, "
        return NotFiniteError(
            f"{what} (the latents or the VAE weights are not finite); {hint}fewer steps or another sampler"
        )

    def _vae_decode(self, x: torch.Tensor, dtype: torch.dtype, generator) -> torch.Tensor:
        original = self.vae.dtype
        if dtype != original:
            self.vae.to(dtype)
        try:
            return self.vae.decode(x.to(dtype), return_dict=False, generator=generator)[0]
        finally:
            if dtype != original:
                self.vae.to(original)
