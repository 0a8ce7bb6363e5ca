"""Image-to-image: an image noised to `strength` of the schedule, then denoised towards the prompt, called as
diffusers' StableDiffusionImg2ImgPipeline. The module path is written into saved pipelines' model_index.json."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from gen.pipelines import images as I
from gen.pipelines.base import LatentDiffusionPipeline
from gen.pipelines.checks import check_strength
from gen.text.encode import ClipSkip


class ImageToImagePipeline(LatentDiffusionPipeline):
    """Change an image towards a prompt, called like diffusers' StableDiffusionImg2ImgPipeline, with the same
    components as gen's TextToImagePipeline (so `ImageToImagePipeline.from_pipe(t2i)` shares its weights).

    With the same components, scheduler and generator it gives diffusers' images. Differences: 20 steps and
    guidance 5.0 by default (they suit a small model), `height`/`width` to resize the image (default: its own
    size, rounded down to a multiple of the denoiser's stride), and one generator per image in a list encodes
    that image's own VAE sample (diffusers' img2img does too)."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        strength: float = 0.8,
        num_inference_steps: int = 20,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: ClipSkip = None,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        guidance_rescale: float = 0.0,
        guidance_interval: tuple[float, float] | None = None,
        truncate_long_prompts: bool = False,
        prompt_weighting: bool = True,
        prompt_2: str | list[str] | None = None,  # SDXL's second encoder's prompt
        negative_prompt_2: str | list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Steps: 1. check the inputs; 2. encode the prompts; 3. the last `strength` of the timesteps;
        4. the image's latents noised to the first of them; 5. denoise with classifier-free guidance; 6. decode.
        """
        # 1. Check the inputs; the size is the image's unless given.
        I.check_image(image)
        image = I.as_float(image)
        height, width = self._size_of(image, height, width)
        check_strength(strength, num_inference_steps, timesteps, sigmas)
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
            xl={"prompt_2": prompt_2, "negative_prompt_2": negative_prompt_2},
        )
        batch, dtype = text.prompt_embeds.shape[0], text.prompt_embeds.dtype

        # 3. The last `strength` of the schedule.
        steps = self._timesteps(num_inference_steps, device, timesteps, sigmas, strength)

        # 4. The image's latents, noised to the first remaining timestep.
        pixels = self.image_processor_for_stride.preprocess(image, height=height, width=width)
        latents = I.encode(self.vae, pixels.to(device=device, dtype=dtype), generator, batch)
        noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=dtype)
        latents = self.scheduler.add_noise(latents, noise, steps[:1].repeat(batch))

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
