"""Inpainting: repaint the white part of a mask, called as diffusers' StableDiffusionInpaintPipeline. The module
path is written into saved pipelines' model_index.json."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from gen.pipelines import images as I
from gen.pipelines.base import LatentDiffusionPipeline
from gen.pipelines.checks import check_strength
from gen.pipelines.prompting import TextContext
from gen.text.encode import ClipSkip


class InpaintPipeline(LatentDiffusionPipeline):
    """Repaint the white part of `mask_image`, called like diffusers' StableDiffusionInpaintPipeline, with the
    same components as gen's TextToImagePipeline (`InpaintPipeline.from_pipe(t2i)` shares its weights).

    Any denoiser whose input is the VAE's latents (SD 1.x/2.x UNets, gen's DiT) keeps the unmasked region by
    re-noising the image's latents to each step and blending them in outside the mask; an inpainting denoiser
    (latents + mask + masked-image latents: 9 input channels for SD) is conditioned on them instead, as
    SD-inpainting checkpoints were trained to be.

    With the same components, scheduler and generator it gives diffusers' images. Differences: 20 steps and
    guidance 5.0 by default; the size defaults to the image's own (rounded down to the denoiser's stride;
    diffusers' is the model's 512); a mask of another size than the image is refused (diffusers resizes it);
    with a list of generators each image's VAE samples use its own generator (diffusers' inpaint uses the first
    for all, so an image would depend on its batch)."""

    @property
    def conditioned(self) -> bool:
        """Does the denoiser take the mask and masked image as input channels (an inpainting checkpoint)?"""
        latent = self.vae.config.latent_channels
        channels = self.denoiser.config.in_channels
        if channels not in (latent, 2 * latent + 1):
            raise ValueError(
                f"the {self.denoiser_name} takes {channels} input channels; inpainting needs {latent} (the VAE's"
                f" latents) or {2 * latent + 1} (latents, mask and masked-image latents)"
            )
        return channels == 2 * latent + 1

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        mask_image: Any = None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 1.0,
        num_inference_steps: int = 20,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: ClipSkip = None,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        guidance_rescale: float = 0.0,
        guidance_interval: tuple[float, float] | None = None,
        truncate_long_prompts: bool = False,
        prompt_weighting: bool = True,
        prompt_2: str | list[str] | None = None,  # SDXL's second encoder's prompt
        negative_prompt_2: str | list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Steps: 1. check the inputs; 2. encode the prompts; 3. the last `strength` of the timesteps; 4. image
        and mask as tensors (cropped around the mask with padding_mask_crop); 5. initial latents; 6. mask
        latents; 7. denoise, keeping or conditioning on the unmasked region; 8. decode (pasting a crop back).
        """
        # 1. Check the inputs; the size is the image's unless given.
        I.check_image(image)
        I.check_mask(mask_image, image, self.vae.config.latent_channels)
        image, mask_image = I.as_float(image), I.as_mask(mask_image)
        I.check_crop(padding_mask_crop, image, mask_image, output_type)
        height, width = self._size_of(image, height, width)
        check_strength(strength, num_inference_steps, timesteps, sigmas)
        conditioned = self.conditioned  # checks the denoiser's input channels

        # 2. The checks every task shares; encode the prompt and negative prompt (and SDXL's size conditioning).
        device, text, tensor_inputs = self._check_and_encode(
            height=height,
            width=width,
            prompt=prompt,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            guidance_interval=guidance_interval,
            num_images_per_prompt=num_images_per_prompt,
            output_type=output_type,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            cross_attention_kwargs=cross_attention_kwargs,
            clip_skip=clip_skip,
            truncate_long_prompts=truncate_long_prompts,
            prompt_weighting=prompt_weighting,
            generator=generator,
            xl={"prompt_2": prompt_2, "negative_prompt_2": negative_prompt_2},
        )
        batch = text.prompt_embeds.shape[0]

        # 3. The last `strength` of the schedule.
        steps = self._timesteps(num_inference_steps, device, timesteps, sigmas, strength)

        # 4. Image and mask as tensors, cropped to the mask's region (plus padding) when asked.
        crop = None
        if padding_mask_crop is not None:
            crop = self.mask_processor.get_crop_region(mask_image, width, height, pad=padding_mask_crop)
        mode = "fill" if crop else "default"
        pixels = self.image_processor_for_stride.preprocess(
            image, height=height, width=width, crops_coords=crop, resize_mode=mode
        ).to(dtype=torch.float32)
        mask = self.mask_processor.preprocess(
            mask_image, height=height, width=width, resize_mode=mode, crops_coords=crop
        )

        # 5.-6. Initial latents and the mask at latent size; then denoise and decode.
        start = self._start(pixels, steps, batch, text, device, generator, latents, strength, conditioned)
        masked = pixels * (mask < 0.5) if masked_image_latents is None else masked_image_latents
        small, masked = self._mask_latents(mask, masked, batch, text, device, generator, height, width)
        latents, image_latents, noise = start

        # 7. Denoise: an inpainting denoiser sees the mask and masked image; any other keeps the unmasked
        # region by blending in the image's latents, re-noised to the next step.
        def keep_unmasked(i: int, x: torch.Tensor) -> torch.Tensor:
            known = image_latents
            if i < len(steps) - 1:
                known = self.scheduler.add_noise(image_latents, noise, steps[i + 1 : i + 2])
            return (1 - small) * known + small * x

        latents = self._denoising_loop(
            latents,
            steps,
            text,
            step_kwargs=self._step_kwargs(generator, eta),
            guidance_rescale=guidance_rescale,
            guidance_interval=guidance_interval,
            callback=callback_on_step_end,
            tensor_inputs=tensor_inputs,
            condition=torch.cat([small, masked], dim=1) if conditioned else None,
            after_step=None if conditioned else keep_unmasked,
        )

        # 8. Decode; a crop is pasted back into the original image, as diffusers does.
        overlay = None
        if crop is not None:
            processor = self.image_processor_for_stride

            def overlay(images: list) -> list:
                return [processor.apply_overlay(mask_image, image, out, crop) for out in images]

        return self._finish(latents, generator, output_type, return_dict, overlay)

    def _start(
        self, pixels, steps, batch, text: TextContext, device, generator, latents, strength, conditioned
    ):
        """(latents, image latents, noise): noise at strength 1, else the image's latents noised to the first
        step; the image's latents are kept when the loop blends them in. The order in which the generator is
        drawn from is diffusers': image encoding, then noise."""
        dtype = text.prompt_embeds.dtype
        full = strength == 1.0
        image_latents = None
        if not conditioned or (latents is None and not full):
            image_latents = I.encode(self.vae, pixels.to(device=device, dtype=dtype), generator, batch)
        shape = (
            batch,
            self.vae.config.latent_channels,
            *(s // self.vae_scale_factor for s in pixels.shape[-2:]),
        )
        if latents is not None:
            noise = latents.to(device)
            return noise * self.scheduler.init_noise_sigma, image_latents, noise
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        if full:
            return noise * self.scheduler.init_noise_sigma, image_latents, noise
        return self.scheduler.add_noise(image_latents, noise, steps[:1].repeat(batch)), image_latents, noise

    def _mask_latents(self, mask, masked, batch, text: TextContext, device, generator, height, width):
        """The mask at latent size (B, 1, h, w) and the masked image's latents (B, C, h, w).

        diffusers encodes the masked image whatever the denoiser, which draws from the generator; gen does the
        same (the VAE's posterior sample), so stochastic samplers (Euler ancestral, eta > 0) match it."""
        dtype = text.prompt_embeds.dtype
        size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        small = torch.nn.functional.interpolate(mask, size=size).to(device=device, dtype=dtype)
        masked = I.encode(self.vae, masked.to(device=device, dtype=dtype), generator, batch)
        return I.expand(small, batch, "mask"), masked
