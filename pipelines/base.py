"""What gen's pipelines share: components, loading, prompt encoding (prompting.py), noise, the guided denoising
loop with one CFG formula (gen.diffusion.guidance), and decoding. Each task's pipeline adds only its `__call__`."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.configuration_utils import FrozenDict
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import FromSingleFileMixin, TextualInversionLoaderMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import deprecate
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from gen.diffusion.guidance import guidance
from gen.loading.safety import PICKLE
from gen.models.dit import DiT
from gen.pipelines.checks import check_call
from gen.pipelines.lora import LoraMixin
from gen.pipelines.prompting import PromptEncodingMixin, TextContext
from gen.pipelines.sdxl import SDXLMixin
from gen.text.encode import ClipSkip

logger = logging.getLogger(__name__)

GUIDANCE_USUAL = 30.0  # A1111's CFG slider ends here; far above it the latents overflow


class NotFiniteError(ValueError, FloatingPointError):
    """A generated picture with NaN or infinite values: a ValueError, since a request's settings (a huge guidance
    scale) cause it as often as broken weights, so front-ends answer it as bad input, in one line."""


def _inside(step: int, total: int, interval: tuple[float, float] | None) -> bool:
    """Is this step inside the guidance interval (fractions of the schedule, start inclusive)?"""
    if interval is None:
        return True
    return interval[0] <= step / total < interval[1]


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
    if fixes:
        scheduler._internal_dict = FrozenDict({**scheduler.config, **fixes})


class LatentDiffusionPipeline(
    DiffusionPipeline,
    PromptEncodingMixin,
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

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, allow_pickle: bool = False, **kwargs):
        """diffusers' loader behind gen's checks (gen.loading.safety): a local folder only, safetensors unless
        allow_pickle, classes from diffusers/transformers/gen only, whole files, finite weights."""
        from gen.loading.safety import check_finite, check_folder

        folder = Path(pretrained_model_name_or_path)
        check_folder(folder, allow_pickle)
        kwargs.setdefault("local_files_only", True)
        kwargs.setdefault(
            "use_safetensors", None if allow_pickle else True
        )  # None: safetensors first, then pickle
        try:
            pipe = super().from_pretrained(str(folder), **kwargs)
        except (
            ValueError,
            RuntimeError,
            OSError,
        ) as e:  # a library's multi-line message, made one clear line
            detail = str(e).split(". If you want")[0].replace("Cannot load because ", "")
            raise ValueError(f"{folder}: could not load it: {' '.join(detail.split())}") from None
        check_finite(pipe, folder)
        return pipe

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path, **kwargs):
        """diffusers' single-file loader, offline: without `config=`, gen's shipped SD 1.x/2.x configs are used."""
        if "config" not in kwargs:
            from gen.loading.single_file import load_single_file

            return load_single_file(
                pretrained_model_link_or_path, torch_dtype=kwargs.get("torch_dtype", torch.float32)
            )
        kwargs.setdefault("local_files_only", True)
        return super().from_single_file(pretrained_model_link_or_path, **kwargs)

    def load_textual_inversion(
        self, pretrained_model_name_or_path, token=None, allow_pickle: bool = False, **kwargs
    ):
        """diffusers' loader (A1111 and diffusers embedding formats), refusing pickle files unless allow_pickle:
        a .pt/.bin/.ckpt file can run code when unpickled. With allow_pickle, diffusers reads it with
        torch.load(weights_only=True)."""
        sources = pretrained_model_name_or_path
        for source in sources if isinstance(sources, list) else [sources]:
            suffix = Path(str(source)).suffix.lower() if isinstance(source, (str, Path)) else ""
            if suffix in PICKLE and not allow_pickle:
                raise ValueError(
                    f"{source}: {suffix} embeddings are pickle files, which can run code when loaded; use a"
                    " .safetensors file or pass allow_pickle=True"
                )
        kwargs.setdefault("local_files_only", True)
        return super().load_textual_inversion(pretrained_model_name_or_path, token=token, **kwargs)

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
        from gen.pipelines.images import processors

        return processors(self.latent_stride)[0]

    @property
    def mask_processor(self) -> VaeImageProcessor:
        """diffusers' inpainting mask processor (grayscale, binarized at 0.5) at the denoiser's stride."""
        from gen.pipelines.images import processors

        return processors(self.latent_stride)[1]

    def _size_of(self, image, height: int | None, width: int | None) -> tuple[int, int]:
        """(height, width): as given, else the image's own, rounded down to a multiple of the stride."""
        from gen.pipelines.images import pixel_size

        size = pixel_size(image, self.vae.config.latent_channels)
        if size is None:  # latents given as the image
            first = image[0] if isinstance(image, list) else image
            size = (first.shape[-1] * self.vae_scale_factor, first.shape[-2] * self.vae_scale_factor)
        stride = self.latent_stride
        if (not height and size[1] < stride) or (not width and size[0] < stride):
            raise ValueError(
                f"the image is {size[0]}x{size[1]}, smaller than this model's stride of {stride} pixels; give an"
                f" image of at least {stride}x{stride}, or the size (height, width)"
            )
        return height or size[1] // stride * stride, width or size[0] // stride * stride

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

    def _step_kwargs(self, generator, eta: float) -> dict[str, Any]:
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    def _denoise(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        chunks: list[int] | None = None,
        added: dict[str, torch.Tensor] | None = None,
        rows: list[int] | None = None,
    ) -> torch.Tensor:
        """The denoiser on the step's batch (both denoisers share UNet2DConditionModel's calling convention);
        `rows`: which rows of the step's batch `x` holds (None: all of them, in order).

        With `chunks` (each row's own number of text chunks), rows of equal count run together with the
        batch's padding chunks cut off: attention would otherwise attend to them, and a prompt's image would
        depend on a longer prompt in its batch. Grouping rather than an attention mask keeps each row's
        computation the same as in a run of its own (a mask changes the attention kernel), for any denoiser."""
        if chunks is None:
            return self._denoiser_call(x, t, context, added, rows)
        length = context.shape[1] // max(chunks)
        out: list[torch.Tensor | None] = [None] * len(chunks)
        for k in sorted(set(chunks)):
            group = [i for i, c in enumerate(chunks) if c == k]
            part = None if added is None else {name: v[group] for name, v in added.items()}
            within = group if rows is None else [rows[i] for i in group]
            preds = self._denoise(x[group], t, context[group, : k * length], added=part, rows=within)
            for i, pred in zip(group, preds, strict=True):
                out[i] = pred
        return torch.stack(out)  # (rows, C, h, w)

    def _denoiser_call(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, added=None, rows=None, **extra
    ) -> torch.Tensor:
        """One call of the denoiser on `rows` of the step's batch; a task adds inputs through `extra` (ControlNet's
        residuals, gen.pipelines.controlnet)."""
        kw = {
            "cross_attention_kwargs": self.cross_attention_kwargs,
            **extra,
        }  # {"scale": s}: the LoRA's weight
        if added is not None:  # SDXL's pooled text and size conditioning
            kw["added_cond_kwargs"] = added
        return self.denoiser(x, t, encoder_hidden_states=context, return_dict=False, **kw)[0]

    def decode_latents(self, latents: torch.Tensor, generator=None) -> torch.Tensor:
        """Latents -> images in [-1, 1]. fp16 VAEs decode in fp32 (they overflow); NaN output is an error."""
        vae = self.vae
        x = latents / vae.config.scaling_factor  # (B, C, h, w)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if (
            mean is not None and std is not None
        ):  # VAEs with per-channel statistics, as SDXL's pipeline reads them
            shape = (1, len(mean), 1, 1)
            x = x * torch.tensor(std).view(shape).to(x) + torch.tensor(mean).view(shape).to(x)
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

    def _denoising_loop(
        self,
        latents: torch.Tensor,  # (B, C, h, w)
        steps: torch.Tensor,
        text: TextContext,
        step_kwargs: dict,
        guidance_rescale: float,
        guidance_interval: tuple[float, float] | None,
        callback: Callable | None,
        tensor_inputs: list[str],
        condition: torch.Tensor | None = None,
        after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The guided loop. `condition` (B, c, h, w) is concatenated to the scaled latents as extra input
        channels (an inpainting denoiser's mask and masked image); `after_step(i, latents)` runs after each
        scheduler step, before the callback (inpainting's blend of the known region)."""
        cfg = self.do_classifier_free_guidance
        both = text.both() if cfg else None  # (2B, L*K, D), negatives first
        with self.progress_bar(total=len(steps)) as progress:
            for i, t in enumerate(steps):
                if self.interrupt:
                    break
                # Outside the guidance interval only the text branch runs: half the denoiser work.
                guided = cfg and _inside(i, len(steps), guidance_interval)
                self._step = (i, guided)  # where the loop is, for what a task adds to each denoiser call
                x_in = torch.cat([latents, latents]) if guided else latents  # (2B|B, C, h, w)
                x_in = self.scheduler.scale_model_input(x_in, t)
                if condition is not None:
                    x_in = torch.cat([x_in, torch.cat([condition] * (2 if guided else 1))], dim=1)
                if guided:
                    pred_uncond, pred_text = self._denoise(
                        x_in, t, both, text.rows(2), text.added(True)
                    ).chunk(2)
                    pred = guidance(pred_uncond, pred_text, self.guidance_scale, guidance_rescale)
                else:
                    pred = self._denoise(x_in, t, text.prompt_embeds, text.rows(1), text.added(False))
                latents = self.scheduler.step(pred, t, latents, **step_kwargs, return_dict=False)[0]
                if after_step is not None:
                    latents = after_step(i, latents)
                if callback is not None:
                    latents = self._callback(
                        callback, i, t=t, latents=latents, text=text, tensor_inputs=tensor_inputs
                    )
                    both = text.both() if cfg else None  # the callback may have replaced the embeddings
                progress.update()
        return latents

    def _callback(self, callback: Callable, i: int, t, latents, text: TextContext, tensor_inputs: list[str]):
        """diffusers' callback_on_step_end: it may replace the latents and the embeddings."""
        local = {
            "latents": latents,
            "prompt_embeds": text.prompt_embeds,
            "negative_prompt_embeds": text.negative_prompt_embeds,
        }
        out = callback(self, i, t, {k: local[k] for k in tensor_inputs})
        if out is None:
            out = {}
        elif not isinstance(out, dict):  # diffusers would fail later with "argument of type ... not iterable"
            raise TypeError(
                f"callback_on_step_end must return a dict of tensors (or None), got {type(out).__name__}"
            )
        if "prompt_embeds" in out or "negative_prompt_embeds" in out:
            text.prompt_embeds = out.pop("prompt_embeds", text.prompt_embeds)
            text.negative_prompt_embeds = out.pop("negative_prompt_embeds", text.negative_prompt_embeds)
            text.chunks = None  # the callback's embeddings: every token is attended to
        return out.pop("latents", latents)
