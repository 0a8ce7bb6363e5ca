"""Text-to-image with a CLIP text encoder, a latent denoiser (our DiT or diffusers' UNet), any diffusers scheduler.

The module path gen.pipelines.text_to_image.TextToImagePipeline is written into saved pipelines' model_index.json:
it is part of the file format.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from gen.pipelines.attention_backend import set_attention  # noqa: F401  (re-exported: pipelines users import it here)
from gen.pipelines.base import LatentDiffusionPipeline
from gen.text.encode import ClipSkip


class TextToImagePipeline(LatentDiffusionPipeline):
    """Generate images from text, called exactly like diffusers' StableDiffusionPipeline.

    Exactly one denoiser: `transformer` (gen's DiT) or `unet` (diffusers' UNet2DConditionModel). Loads our own
    saved pipelines and Stable Diffusion 1.x/2.x diffusers folders (the safety checker is not loaded).
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 20,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 5.0,
        guidance_rescale: float = 0.0,
        guidance_interval: tuple[float, float] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        # {"scale": s}: the LoRA weight on the denoiser and the text encoder, as in StableDiffusionPipeline
        cross_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        clip_skip: ClipSkip = None,
        truncate_long_prompts: bool = False,
        prompt_weighting: bool = True,
        # SDXL (a pipeline with text_encoder_2), as StableDiffusionXLPipeline takes them
        prompt_2: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        denoising_end: float | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate images from text, as StableDiffusionPipeline.__call__ does (same arguments and defaults, but
        20 steps and guidance 5.0, which suit a small model).

        SDXL pipelines (text_encoder_2, tokenizer_2 and a "text_time" UNet) take StableDiffusionXLPipeline's
        arguments too: prompt_2, negative_prompt_2, pooled embeddings, the size conditioning and denoising_end.

        gen's additions: `guidance_interval` (start, end), fractions of the schedule where CFG runs (outside it
        only the text branch: half the denoiser work); `truncate_long_prompts` (cut at one window, as SD,
        instead of chunking); `prompt_weighting` (A1111's (word:1.2) syntax, on by default).

        Steps: 1. check the inputs; 2. encode the prompt and negative prompt; 3. timesteps; 4. initial noise;
        5. denoise with classifier-free guidance; 6. decode the latents.
        """
        # 1. Check the inputs, with the model's own size as the default.
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        self._check_plain_denoiser()

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
            xl={
                "prompt_2": prompt_2,
                "negative_prompt_2": negative_prompt_2,
                "pooled_prompt_embeds": pooled_prompt_embeds,
                "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds,
            },
            sizes={
                "original_size": original_size,
                "crops_coords_top_left": crops_coords_top_left,
                "target_size": target_size,
                "negative_original_size": negative_original_size,
                "negative_crops_coords_top_left": negative_crops_coords_top_left,
                "negative_target_size": negative_target_size,
            },
        )

        # 3. Timesteps (SDXL's denoising_end stops early, for a refiner to finish).
        steps = self._timesteps(num_inference_steps, device, timesteps, sigmas, denoising_end=denoising_end)

        # 4. Initial noise, one generator per image where a list is given.
        latents = self.prepare_latents(
            batch_size=text.prompt_embeds.shape[0],
            height=height,
            width=width,
            dtype=text.prompt_embeds.dtype,
            device=device,
            generator=generator,
            latents=latents,
        )

        # 5. Denoise with classifier-free guidance.
        latents = self._denoising_loop(
            latents,
            steps,
            text,
            step_kwargs=self._step_kwargs(generator, eta),
            guidance_rescale=guidance_rescale,
            guidance_interval=guidance_interval,
            callback=callback_on_step_end,
            tensor_inputs=tensor_inputs,
        )

        # 6. Decode.
        return self._finish(latents, generator, output_type, return_dict)
