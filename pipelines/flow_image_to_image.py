"""Image-to-image for SD3 and Flux: the init image's latents noised to the first of the last `strength` of the
flow schedule (`scheduler.scale_noise`), then denoised towards the prompt; called as diffusers'
StableDiffusion3Img2ImgPipeline and FluxImg2ImgPipeline are. The text-to-image pipelines' steps are reused
whole: this mixin only changes where the latents start (gen.pipelines.flow's two hooks).

With the same components, scheduler and generator the images are diffusers'. As in gen's SD image-to-image, a
list of generators encodes image i's own VAE sample with generator i, and `height`/`width` default to the image's
own size rounded down to the model's stride (diffusers' default is the model's size).

The module paths gen.pipelines.flow_image_to_image.{SD3,Flux}ImageToImagePipeline are written into saved
pipelines' model_index.json.
"""

from __future__ import annotations

from typing import Any

import torch

from gen.pipelines import images as I
from gen.pipelines.checks import check_strength
from gen.pipelines.flux import FluxTextToImagePipeline
from gen.pipelines.sd3 import SD3TextToImagePipeline


class FlowImageToImageMixin:
    """`__call__(prompt, image, strength, ...)` on a flow-matching text-to-image pipeline."""

    _steps = 28  # the diffusers Img2Img / Inpaint pipeline's default num_inference_steps
    _guidance: float | None = None  # its guidance_scale default, where it differs from the text-to-image one
    _init: tuple | None = None  # (image, strength, height, width) for the call in progress
    _clean: torch.Tensor | None = None  # the image's latents, for the call in progress

    @torch.no_grad()
    def __call__(
        self, prompt=None, image: Any = None, strength: float = 0.6, num_inference_steps=None, **kwargs
    ):
        """diffusers' Img2Img pipeline's arguments and defaults (strength 0.6, the class's steps and guidance);
        the rest as the text-to-image pipeline takes them."""
        return self._image_call(prompt, image, strength, num_inference_steps or self._steps, kwargs)

    def _image_call(self, prompt, image: Any, strength: float, steps: int, kwargs: dict):
        if self._guidance is not None:
            kwargs.setdefault("guidance_scale", self._guidance)
        I.check_image(image)
        image = I.as_float(image)
        height, width = self._size_of(image, kwargs.pop("height", None), kwargs.pop("width", None))
        check_strength(strength, steps, None, kwargs.get("sigmas"))
        self._init = (image, strength, height, width)
        try:
            return super().__call__(prompt, height=height, width=width, num_inference_steps=steps, **kwargs)
        finally:
            self._init, self._clean = None, None

    def _initial_latents(self, shape: tuple, dtype, device, generator, latents=None) -> torch.Tensor:
        """The image's latents (kept for _start), then the noise, drawn in that order as diffusers draws them;
        latents given by the caller are used as they are (as in diffusers)."""
        if latents is not None:
            return self._noise(shape, dtype, device, generator, latents)
        image, _, height, width = self._init
        pixels = self._pixels(image, height, width).to(torch.float32)
        self._clean = I.encode(self.vae, pixels.to(device=device, dtype=dtype), generator, shape[0])
        return self._noise(shape, dtype, device, generator)

    def _pixels(self, image, height: int, width: int) -> torch.Tensor:
        """The image as the VAE reads it (inpainting's crop cuts it first)."""
        return self.image_processor.preprocess(image, height=height, width=width)

    def _start(self, latents: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last `strength` of the schedule (diffusers' get_timesteps), and the image noised to its first."""
        strength = self._init[1]
        count = self._inference_steps
        begin = int(max(count - min(count * strength, count), 0)) * self.scheduler.order
        steps = steps[begin:]
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(begin)
        self._num_timesteps = len(steps)
        if self._clean is None:  # the caller's latents
            return latents, steps
        first = steps[:1].repeat(latents.shape[0])
        return self.scheduler.scale_noise(self._tokens(self._clean), first, latents), steps


class SD3ImageToImagePipeline(FlowImageToImageMixin, SD3TextToImagePipeline):
    """Change an image towards a prompt with an SD3 folder, as StableDiffusion3Img2ImgPipeline does (strength
    0.6, 50 steps)."""

    _steps = 50


class FluxImageToImagePipeline(FlowImageToImageMixin, FluxTextToImagePipeline):
    """Change an image towards a prompt with a Flux folder, as FluxImg2ImgPipeline does (strength 0.6, 28 steps,
    guidance_scale 7.0 where FluxPipeline's is 3.5)."""

    _guidance = 7.0
