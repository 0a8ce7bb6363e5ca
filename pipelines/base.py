"""What gen's pipelines share: components, checked loading (loaders.py), prompt encoding (prompting.py), noise and
timesteps, the guided denoising loop (denoising.py) and decoding (decoding.py). Each task's pipeline adds only its
`__call__`."""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import FromSingleFileMixin, TextualInversionLoaderMixin
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import deprecate
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from gen.models.dit import DiT
from gen.pipelines.checks import check_call
from gen.pipelines.decoding import DecodingMixin
from gen.pipelines.denoising import DenoisingMixin
from gen.pipelines.images import fit_size, processors
from gen.pipelines.loaders import SafeLoadersMixin
from gen.pipelines.lora import LoraMixin
from gen.pipelines.prompting import PromptEncodingMixin, TextContext
from gen.pipelines.sdxl import SDXLMixin
from gen.text.encode import ClipSkip

logger = logging.getLogger(__name__)


def modernize_scheduler(scheduler) -> None:
    """Rewrite outdated SD scheduler configs (steps_offset != 1, clip_sample=True) as diffusers'
    StableDiffusionPipeline does when it is built, with its deprecation warning, so an old SD folder gives the
    same images in gen as in diffusers."""
    fixes = {}
    if getattr(scheduler.config, "steps_offset", 1) != 1:
        fixes["steps_offset"] = 1
        message = (
            f"The configuration file of this scheduler: {scheduler} is outdated. `steps_offset` should be set"
            f" to 1 instead of {scheduler.config.steps_offset}; gen uses 1, as StableDiffusionPipeline does."
        )
        deprecate("steps_offset!=1", "1.0.0", message, standard_warn=False)
    if getattr(scheduler.config, "clip_sample", False) is True:
        fixes["clip_sample"] = False
        message = (
            f"The configuration file of this scheduler: {scheduler} has not set the configuration `clip_sample`."
            " `clip_sample` should be set to False; gen uses False, as StableDiffusionPipeline does."
        )
        deprecate("clip_sample not set", "1.0.0", message, standard_warn=False)
    if fixes:  # in place, by ConfigMixin's public setter (a scheduler reads its config at every call)
        scheduler.register_to_config(**fixes)


class LatentDiffusionPipeline(
    SafeLoadersMixin,
    DiffusionPipeline,
    PromptEncodingMixin,
    DenoisingMixin,
    DecodingMixin,
    SDXLMixin,
    LoraMixin,
    TextualInversionLoaderMixin,
    FromSingleFileMixin,
):
    """The components and steps gen's pipelines share: a CLIP text encoder, exactly one denoiser (`transformer`,
    gen's DiT, or `unet`, diffusers' UNet2DConditionModel), a VAE and any diffusers scheduler; loading (gen's
    folders, SD 1.x/2.x folders and single files, LoRA, textual inversion), noise, the guided denoising loop
    and decoding. A task's pipeline adds its `__call__` (see text_to_image.py)."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->unet->vae"
    _optional_components = ["transformer", "unet", "text_encoder_2", "tokenizer_2"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler: KarrasDiffusionSchedulers,
        transformer: DiT | None = None,
        unet: UNet2DConditionModel | None = None,
        text_encoder_2: CLIPTextModelWithProjection | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        force_zeros_for_empty_prompt: bool = True,
    ):
        super().__init__()
        # Neither is allowed (a text-only pipeline can still encode_prompt, as diffusers' pipelines can); a call
        # that needs a denoiser says so (see `denoiser`).
        if transformer is not None and unet is not None:
            raise ValueError(
                "TextToImagePipeline needs exactly one denoiser, transformer= or unet=; got both"
            )
        if scheduler is not None:
            modernize_scheduler(scheduler)
        # Only the denoiser given is registered: `components` are then the init components, and a UNet pipeline
        # has no `transformer` attribute, as diffusers' SD pipelines have none. Either may be missing from a
        # folder (the class's _optional_components), but a built pipeline's denoiser is required, so this
        # instance lists none: save_pretrained keeps it, and callers never drop it.
        given = (("transformer", transformer), ("unet", unet), ("text_encoder_2", text_encoder_2))
        nets = {name: net for name, net in (*given, ("tokenizer_2", tokenizer_2)) if net is not None}
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, **nets
        )
        if text_encoder_2 is not None:  # SDXL's setting, kept in its model_index.json only
            self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        self._optional_components = []
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @property
    def denoiser_name(self) -> str | None:
        """ "transformer" (gen's DiT) or "unet": the component that denoises; None in a text-only pipeline."""
        for name in ("transformer", "unet"):
            if getattr(self, name, None) is not None:
                return name
        return None

    @property
    def denoiser(self) -> torch.nn.Module:
        if self.denoiser_name is None:
            raise ValueError("this pipeline has no denoiser: give transformer= (gen's DiT) or unet=")
        return getattr(self, self.denoiser_name)

    @property
    def components(self) -> dict[str, Any]:
        """The components this pipeline was built with (diffusers' property expects every optional one)."""
        return {
            k: getattr(self, k)
            for k in self.config
            if not k.startswith("_") and k != "force_zeros_for_empty_prompt"
        }

    @property
    def latent_stride(self) -> int:
        """Pixels per latent token: the VAE's factor, times the patch size for a DiT."""
        patch = getattr(self.denoiser.config, "patch_size", None) or 1
        return self.vae_scale_factor * patch

    @property
    def default_size(self) -> int:
        """Pixels per side when height/width are not given: the denoiser's sample size (512 for SD 1.x)."""
        size = self.denoiser.config.sample_size if self.denoiser_name else 64
        return size * self.vae_scale_factor

    # -- small wrappers users of StableDiffusionPipeline expect --------------------------------------------------
    def enable_vae_slicing(self) -> None:
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.vae.disable_slicing()

    def enable_vae_tiling(self) -> None:
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def cross_attention_kwargs(self) -> dict[str, Any] | None:
        return getattr(self, "_cross_attention_kwargs", None)

    # -- inputs ------------------------------------------------------------------------------------------------
    def check_inputs(self, **kwargs) -> None:
        """Refuse bad input before any work, naming the value and the rule (see gen.pipelines.checks)."""
        check_call(self, **kwargs)

    @property
    def image_processor_for_stride(self) -> VaeImageProcessor:
        """diffusers' image processor at the denoiser's stride (a DiT's patch too), for image inputs."""
        return processors(self.latent_stride)[0]

    @property
    def mask_processor(self) -> VaeImageProcessor:
        """diffusers' inpainting mask processor (grayscale, binarized at 0.5) at the denoiser's stride."""
        return processors(self.latent_stride)[1]

    def _size_of(self, image, height: int | None, width: int | None) -> tuple[int, int]:
        """(height, width): as given, else the image's own, rounded down to a multiple of the stride."""
        return fit_size(self, image, height, width)

    def _check_plain_denoiser(self) -> None:
        """Text-to-image and image-to-image need a denoiser that takes the VAE's latents alone; an inpainting
        checkpoint's (latents, mask and masked image) is for InpaintPipeline."""
        channels = self.denoiser.config.in_channels  # first: a text-only pipeline's own clear error
        if self.vae is not None and channels == 2 * self.vae.config.latent_channels + 1:
            raise ValueError(
                f"this {self.denoiser_name} is an inpainting model ({channels} input channels: latents, mask and"
                " masked image): use InpaintPipeline, or on the command line --init-image and --mask"
            )

    @staticmethod
    def _check_generators(generator, batch_size: int) -> None:
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"got {len(generator)} generators for {batch_size} images (prompts x num_images_per_prompt);"
                " give one generator or one per image"
            )

    def prepare_latents(
        self,
        batch_size: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        channels = self.denoiser.config.in_channels
        shape = (batch_size, channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        self._check_generators(generator, batch_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    # -- the steps every task's __call__ shares ------------------------------------------------------------------
    def _begin(self, guidance_scale: float, cross_attention_kwargs: dict[str, Any] | None) -> torch.device:
        """The call's state that the properties (guidance_scale, interrupt, ...) read; the execution device."""
        self._guidance_scale = guidance_scale
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        return self._execution_device

    def _check_and_encode(
        self,
        *,
        height: int,
        width: int,
        prompt,
        negative_prompt,
        prompt_embeds,
        negative_prompt_embeds,
        num_inference_steps: int,
        guidance_scale: float,
        guidance_rescale: float,
        guidance_interval,
        num_images_per_prompt: int,
        output_type: str,
        callback_on_step_end_tensor_inputs: list[str] | None,
        cross_attention_kwargs: dict[str, Any] | None,
        clip_skip: ClipSkip,
        truncate_long_prompts: bool,
        prompt_weighting: bool,
        generator=None,
        xl: dict | None = None,
        sizes: dict | None = None,
    ) -> tuple[torch.device, TextContext, list[str]]:
        """Steps 1 and 2 of every task's call (after the task's own checks): check the shared inputs, set the
        call's state, encode the prompts and negatives (repeated per image), add SDXL's size conditioning
        (`sizes`: StableDiffusionXLPipeline's size arguments, default the image's). Returns the device, the text
        context and the callback's tensor names."""
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        self.check_inputs(
            prompt=prompt,
            negative_prompt=negative_prompt,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            output_type=output_type,
            callback_on_step_end_tensor_inputs=tensor_inputs,
            num_images_per_prompt=num_images_per_prompt,
            guidance_interval=guidance_interval,
            clip_skip=clip_skip,
        )
        device = self._begin(guidance_scale, cross_attention_kwargs)
        text = self._text(
            prompt,
            device,
            num_images_per_prompt,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            clip_skip=clip_skip,
            truncate=truncate_long_prompts,
            weighting=prompt_weighting,
            xl=xl,
        )
        self._add_time_ids(text, height, width, **(sizes or {}))
        self._check_generators(generator, text.prompt_embeds.shape[0])
        return device, text, tensor_inputs

    def _text(self, prompt, device: torch.device, num_images_per_prompt: int, **encode: Any) -> TextContext:
        """Encode the prompts and negatives, each prompt's entries repeated per image. A LoRA scale in
        cross_attention_kwargs applies to the text encoder too, as in StableDiffusionPipeline."""
        self._scale_text_encoder_lora(self.cross_attention_kwargs)
        try:
            text = self._encode_text(prompt, device, cfg=self.do_classifier_free_guidance, **encode)
        finally:
            self._unscale_text_encoder_lora()
        return text.repeat(num_images_per_prompt)

    def _timesteps(
        self,
        num_inference_steps: int,
        device: torch.device,
        timesteps: list[int] | None,
        sigmas: list[float] | None,
        strength: float | None = None,
        denoising_end: float | None = None,
    ) -> torch.Tensor:
        """The schedule's timesteps; with `strength` (image-to-image, inpainting) only its last
        int(steps x strength) steps, the scheduler told where it begins, as diffusers' SD img2img does; with
        `denoising_end` (SDXL's base + refiner split), only those above that fraction of the training steps."""
        steps, count = retrieve_timesteps(
            self.scheduler, num_inference_steps, device=device, timesteps=timesteps, sigmas=sigmas
        )
        if strength is not None:
            # diffusers' get_timesteps is a method of its img2img pipeline, not a function we can import.
            start = count - min(int(count * strength), count)
            order = self.scheduler.order
            steps = self.scheduler.timesteps[start * order :]
            if hasattr(self.scheduler, "set_begin_index"):
                self.scheduler.set_begin_index(start * order)
        self._scheduled_steps = len(
            steps
        )  # before denoising_end: ControlNet's guidance fractions count these
        if denoising_end is not None and 0 < denoising_end < 1:
            total = self.scheduler.config.num_train_timesteps
            cutoff = int(round(total - denoising_end * total))
            steps = steps[: sum(1 for t in steps if t >= cutoff)]
        self._num_timesteps = len(steps)
        return steps
