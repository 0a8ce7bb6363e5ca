"""Inpainting for SD3 and Flux: image-to-image (gen.pipelines.flow_image_to_image) that, after every step, puts
the image back outside the mask, noised to the next step's level (`scale_noise`), as diffusers'
StableDiffusion3InpaintPipeline and FluxInpaintPipeline do for text-to-image transformers; called as they are.

With the same components, scheduler and generator the images are diffusers'. As diffusers' SD3 pipeline does
only for 16-channel transformers (SD3's), gen blends for any channel count. The masked image's latents, which
these pipelines encode but never read for such transformers, are not encoded. `padding_mask_crop` is
diffusers' (the mask's region, grown and cut at the call's aspect ratio, repainted at the call's size and pasted
back).

The module paths gen.pipelines.flow_inpaint.{SD3,Flux}InpaintPipeline are written into saved pipelines'
model_index.json.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from gen.pipelines import images as I
from gen.pipelines.flow_image_to_image import FlowImageToImageMixin
from gen.pipelines.flux import FluxTextToImagePipeline
from gen.pipelines.sd3 import SD3TextToImagePipeline


class FlowInpaintMixin(FlowImageToImageMixin):
    """`__call__(prompt, image, mask_image, strength, ...)`: white in the mask is repainted."""

    _mask_image: Any = None  # the call's mask, as given
    _mask: torch.Tensor | None = None  # ... at the latents' size, as the transformer reads latents
    _noise_tokens: torch.Tensor | None = None  # the call's noise, as the transformer reads latents

    _pad: int | None = None  # the call's padding_mask_crop
    _crop: tuple | None = None  # ... and the region it cuts, once the size is known
    _original: Any = None  # the call's image, as given (the crop is pasted back into it)

    @torch.no_grad()
    def __call__(
        self, prompt=None, image: Any = None, mask_image: Any = None, strength: float = 0.6, num_inference_steps=None,
        padding_mask_crop: int | None = None, **kwargs,
    ):  # fmt: skip
        """diffusers' Inpaint pipeline's arguments and defaults (strength 0.6, the class's steps and guidance);
        the rest as the text-to-image pipeline takes them. padding_mask_crop=p (PIL image and mask, PIL output)
        repaints only the mask's bounding box grown by p pixels (at the call's aspect ratio), at the call's size,
        and pastes it back into the image, as diffusers does."""
        steps = num_inference_steps or self._steps
        return self._inpaint_call(prompt, image, mask_image, strength, steps, kwargs, padding_mask_crop)

    def _inpaint_call(
        self, prompt, image, mask_image, strength: float, steps: int, kwargs: dict, pad: int | None = None
    ):
        I.check_image(image)
        I.check_mask(mask_image, image, self.vae.config.latent_channels)
        I.check_crop(pad, image, mask_image, kwargs.get("output_type", "pil"))
        self._mask_image, self._pad, self._original = I.as_mask(mask_image), pad, image
        try:
            return self._image_call(prompt, image, strength, steps, kwargs)
        finally:
            self._mask_image, self._mask, self._noise_tokens = None, None, None
            self._pad, self._crop, self._original = None, None, None

    def _resize(self) -> dict:
        """How image and mask are brought to the call's size: cut to the crop and filled, or resized whole."""
        return {"crops_coords": self._crop, "resize_mode": "fill"} if self._crop else {}

    def _pixels(self, image, height: int, width: int) -> torch.Tensor:
        return self.image_processor.preprocess(image, height=height, width=width, **self._resize())

    def _overlay(self):
        if not self._crop:
            return None
        mask, original, crop, processor = self._mask_image, self._original, self._crop, self.image_processor
        return lambda images: [processor.apply_overlay(mask, original, out, crop) for out in images]

    def _initial_latents(self, shape: tuple, dtype, device, generator, latents=None) -> torch.Tensor:
        """Image-to-image's (the image's latents, then the noise), and the mask at the latents' size: nearest
        interpolation of the binarized mask, one channel per latent channel."""
        _, _, height, width = self._init
        mask_processor = I.processors(self.latent_stride)[1]
        if (
            self._pad is not None
        ):  # first: the image (unless the caller gives latents) and the mask are cut to it
            self._crop = mask_processor.get_crop_region(self._mask_image, width, height, pad=self._pad)
        start = super()._initial_latents(shape, dtype, device, generator, latents)
        mask = mask_processor.preprocess(self._mask_image, height=height, width=width, **self._resize())
        mask = F.interpolate(mask, size=shape[2:]).to(device=device, dtype=dtype)  # (k, 1, h, w)
        self._mask = self._tokens(I.expand(mask, shape[0], "mask").repeat(1, shape[1], 1, 1))
        return start

    def _start(self, latents: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._noise_tokens = latents
        return super()._start(latents, steps)

    def _after_step(self, latents: torch.Tensor, i: int, steps: torch.Tensor) -> torch.Tensor:
        """Outside the mask, the image at the next step's noise level (at the last step, the image itself)."""
        if self._clean is None:  # the caller's latents: no image to keep
            return latents
        kept = self._tokens(self._clean)
        if i < len(steps) - 1:
            kept = self.scheduler.scale_noise(kept, torch.tensor([steps[i + 1]]), self._noise_tokens)
        return (1 - self._mask) * kept + self._mask * latents


class SD3InpaintPipeline(FlowInpaintMixin, SD3TextToImagePipeline):
    """Repaint the masked part of an image with an SD3 folder, as StableDiffusion3InpaintPipeline does (strength
    0.6, 50 steps)."""

    _steps = 50


class FluxInpaintPipeline(FlowInpaintMixin, FluxTextToImagePipeline):
    """Repaint the masked part of an image with a Flux folder, as FluxInpaintPipeline does (strength 0.6, 28
    steps, guidance_scale 7.0)."""

    _guidance = 7.0
