"""Text-to-image with a CLIP text encoder, a latent denoiser (our DiT or diffusers' UNet), any diffusers scheduler."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
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
from transformers import CLIPTextModel, CLIPTokenizer

from gen.diffusion.guidance import guidance
from gen.models.attention import set_attention  # noqa: F401  (re-exported: pipelines users import it here)
from gen.models.dit import DiT
from gen.pipelines.checks import check_call
from gen.pipelines.lora import LoraMixin
from gen.text import embed, pad_chunks

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")


def _inside(step: int, total: int, interval: tuple[float, float] | None) -> bool:
    """Is this step inside the guidance interval (fractions of the schedule, start inclusive)?"""
    if interval is None:
        return True
    return interval[0] <= step / total < interval[1]


@dataclass
class TextContext:
    """The text side of one call: (B, L*K, D) embeddings, and each prompt's own chunk count where some prompt
    needs fewer than K (None when every prompt uses all K)."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    chunks: list[int] | None = None

    def repeat(self, n: int) -> TextContext:
        """Each prompt's entries n times in a row (num_images_per_prompt)."""
        neg = self.negative_prompt_embeds
        return TextContext(
            self.prompt_embeds.repeat_interleave(n, 0),
            None if neg is None else neg.repeat_interleave(n, 0),
            None if self.chunks is None else [c for c in self.chunks for _ in range(n)],
        )


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


class TextToImagePipeline(DiffusionPipeline, LoraMixin, TextualInversionLoaderMixin, FromSingleFileMixin):
    """Generate images from text, called exactly like diffusers' StableDiffusionPipeline.

    Exactly one denoiser: `transformer` (gen's DiT) or `unet` (diffusers' UNet2DConditionModel). Loads our own
    saved pipelines and Stable Diffusion 1.x/2.x diffusers folders (the safety checker is not loaded).
    """

    model_cpu_offload_seq = "text_encoder->transformer->unet->vae"
    _optional_components = ["transformer", "unet"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler: KarrasDiffusionSchedulers,
        transformer: DiT | None = None,
        unet: UNet2DConditionModel | None = None,
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
        nets = {name: net for name, net in (("transformer", transformer), ("unet", unet)) if net is not None}
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, **nets
        )
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
        return {k: getattr(self, k) for k in self.config if not k.startswith("_")}

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
        """diffusers' loader behind gen's checks (gen.safety): a local folder only, safetensors unless
        allow_pickle, classes from diffusers/transformers/gen only, whole files, finite weights."""
        from gen.safety import check_finite, check_folder

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
            from gen.single_file import load_single_file

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
            if suffix in PICKLE_SUFFIXES and not allow_pickle:
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
    def check_inputs(self, *args, **kwargs) -> None:
        """Refuse bad input before any work, naming the value and the rule (see gen.pipelines.checks)."""
        check_call(self, *args, **kwargs)

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        clip_skip: int | None = None,
        truncate_long_prompts: bool = False,
        prompt_weighting: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings for the prompt and (with CFG) the negative prompt, repeated per image: (B*n, L*K, D).

        Prompts use A1111's syntax (weights, BREAK) and may be longer than the encoder's window of L tokens
        (77 for SD): every prompt is chunked, and all are padded to the same number of chunks K (see gen.text).
        """
        text = self._encode_text(
            prompt,
            device,
            cfg=do_classifier_free_guidance,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            clip_skip=clip_skip,
            truncate=truncate_long_prompts,
            weighting=prompt_weighting,
        )
        text = text.repeat(num_images_per_prompt)
        # Named returns: diffusers' test mixins read these names to pass the results back into __call__.
        prompt_embeds, negative_prompt_embeds = text.prompt_embeds, text.negative_prompt_embeds
        return prompt_embeds, negative_prompt_embeds

    def _encode_text(
        self, prompt, device, cfg: bool, negative_prompt, prompt_embeds, negative_prompt_embeds, **opts
    ) -> TextContext:
        """Prompts and negatives in one text-encoder call, each pair padded to its own chunk count (as A1111 pads
        the negative), then all to the batch's longest; records each prompt's own count (see _denoise)."""
        prompts = None if prompt_embeds is not None else [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        negatives = None
        if cfg and negative_prompt_embeds is None:
            negatives = (
                negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * batch
            )
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.denoiser.dtype
        if prompts is None and negatives is None:  # embeddings given for everything
            negative = negative_prompt_embeds.to(device=device, dtype=dtype) if cfg else None
            return TextContext(prompt_embeds.to(device=device, dtype=dtype), negative)
        rows, empty = self._embed_unique([*(prompts or []), *(negatives or [])], device, **opts)
        length = empty.shape[0]
        given = [e for e in (prompt_embeds, negative_prompt_embeds if cfg else None) if e is not None]
        if any(e.shape[1] % length for e in given):
            raise ValueError(
                f"prompt_embeds of {given[0].shape[1]} tokens cannot be padded to whole {length}-token chunks;"
                " give negative_prompt_embeds too, of the same shape"
            )
        pos = list(prompt_embeds) if prompts is None else rows[:batch]  # (K_i*L, D) each
        neg = (list(negative_prompt_embeds) if negatives is None else rows[-batch:]) if cfg else []
        own = [max(r.shape[0] for r in pair) // length for pair in zip(pos, neg or pos, strict=True)]
        k = max(own)
        return TextContext(
            pad_chunks(pos, k, empty).to(device=device, dtype=dtype),
            pad_chunks(neg, k, empty).to(device=device, dtype=dtype) if cfg else None,
            own if min(own) < k else None,
        )

    def _embed_unique(self, prompts: list[str], device: torch.device, **opts) -> tuple[list, torch.Tensor]:
        # Repeated prompts (the empty negative above all) are encoded once per call.
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(
                "this pipeline has no text_encoder/tokenizer: give prompt_embeds (and negatives)"
            )
        converted = [
            self.maybe_convert_prompt(p, self.tokenizer) for p in prompts
        ]  # textual-inversion tokens
        unique = list(dict.fromkeys(converted))
        rows, empty = embed(self.tokenizer, self.text_encoder, unique, device, **opts)  # (K_u*L, D) each
        return [rows[unique.index(p)] for p in converted], empty

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
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"got {len(generator)} generators for {batch_size} images (prompts x num_images_per_prompt);"
                " give one generator or one per image"
            )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    def _step_kwargs(self, generator, eta: float) -> dict[str, Any]:
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    def _denoise(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, chunks: list[int] | None = None
    ) -> torch.Tensor:
        """One denoiser call (both denoisers share UNet2DConditionModel's calling convention).

        With `chunks` (each row's own number of text chunks), rows of equal count run together with the
        batch's padding chunks cut off: attention would otherwise attend to them, and a prompt's image would
        depend on a longer prompt in its batch. Grouping rather than an attention mask keeps each row's
        computation the same as in a run of its own (a mask changes the attention kernel), for any denoiser."""
        if chunks is None:
            kw = self.cross_attention_kwargs  # {"scale": s} scales the LoRA, as in StableDiffusionPipeline
            return self.denoiser(
                x, t, encoder_hidden_states=context, cross_attention_kwargs=kw, return_dict=False
            )[0]
        length = context.shape[1] // max(chunks)
        out: list[torch.Tensor | None] = [None] * len(chunks)
        for k in sorted(set(chunks)):
            rows = [i for i, c in enumerate(chunks) if c == k]
            for i, pred in zip(rows, self._denoise(x[rows], t, context[rows, : k * length]), strict=True):
                out[i] = pred
        return torch.stack(out)  # (rows, C, h, w)

    def decode_latents(self, latents: torch.Tensor, generator=None) -> torch.Tensor:
        """Latents -> images in [-1, 1]. fp16 VAEs decode in fp32 (they overflow); NaN output is an error."""
        vae = self.vae
        x = latents / vae.config.scaling_factor  # (B, C, h, w)
        dtype = vae.dtype
        if dtype == torch.float16 and getattr(vae.config, "force_upcast", True):
            dtype = torch.float32
        image = self._vae_decode(x, dtype, generator)
        if torch.isnan(image).any() and dtype != torch.float32:
            logger.warning("VAE decode in %s gave NaN; retrying in float32", dtype)
            image = self._vae_decode(x, torch.float32, generator)
        if torch.isnan(image).any():
            raise FloatingPointError(
                "the decoded image contains NaN (the latents or the VAE weights are not finite); try float32,"
                " fewer steps or another sampler"
            )
        return image

    def _vae_decode(self, x: torch.Tensor, dtype: torch.dtype, generator) -> torch.Tensor:
        original = self.vae.dtype
        if dtype != original:
            self.vae.to(dtype)
        try:
            return self.vae.decode(x.to(dtype), return_dict=False, generator=generator)[0]
        finally:
            if dtype != original:
                self.vae.to(original)

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
        clip_skip: int | None = None,
        truncate_long_prompts: bool = False,
        prompt_weighting: bool = True,
    ) -> ImagePipelineOutput | tuple:
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        self.check_inputs(
            prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, guidance_rescale,
            prompt_embeds, negative_prompt_embeds, output_type, tensor_inputs, num_images_per_prompt,
            guidance_interval,
        )  # fmt: skip
        self._guidance_scale = guidance_scale
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        device = self._execution_device

        self._scale_text_encoder_lora(cross_attention_kwargs)  # as SD's encode_prompt(lora_scale=)
        text = self._encode_text(
            prompt,
            device,
            cfg=self.do_classifier_free_guidance,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            clip_skip=clip_skip,
            truncate=truncate_long_prompts,
            weighting=prompt_weighting,
        ).repeat(num_images_per_prompt)
        prompt_embeds, negative_prompt_embeds, chunks = (
            text.prompt_embeds,
            text.negative_prompt_embeds,
            text.chunks,
        )
        self._unscale_text_encoder_lora()
        steps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )
        self._num_timesteps = len(steps)
        latents = self.prepare_latents(
            prompt_embeds.shape[0], height, width, prompt_embeds.dtype, device, generator, latents
        )
        step_kwargs = self._step_kwargs(generator, eta)
        cfg = self.do_classifier_free_guidance
        both = torch.cat([negative_prompt_embeds, prompt_embeds]) if cfg else None  # (2B, L*K, D)

        with self.progress_bar(total=len(steps)) as progress:
            for i, t in enumerate(steps):
                if self.interrupt:
                    break
                # Outside the guidance interval only the text branch runs: half the denoiser work.
                guided = cfg and _inside(i, len(steps), guidance_interval)
                x_in = torch.cat([latents, latents]) if guided else latents  # (2B|B, C, h, w)
                x_in = self.scheduler.scale_model_input(x_in, t)
                rows = chunks * 2 if guided and chunks else chunks
                pred = self._denoise(x_in, t, both if guided else prompt_embeds, rows)
                if guided:
                    pred_uncond, pred_text = pred.chunk(2)
                    pred = guidance(pred_uncond, pred_text, guidance_scale, guidance_rescale)
                latents = self.scheduler.step(pred, t, latents, **step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:
                    local = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                    }
                    out = callback_on_step_end(self, i, t, {k: local[k] for k in tensor_inputs}) or {}
                    latents = out.pop("latents", latents)
                    if "prompt_embeds" in out or "negative_prompt_embeds" in out:
                        prompt_embeds = out.pop("prompt_embeds", prompt_embeds)
                        negative_prompt_embeds = out.pop("negative_prompt_embeds", negative_prompt_embeds)
                        both = torch.cat([negative_prompt_embeds, prompt_embeds]) if cfg else None
                        chunks = None  # the callback's embeddings: every token is attended to
                progress.update()

        if output_type == "latent":
            image = latents
        else:
            image = self.image_processor.postprocess(
                self.decode_latents(latents, generator), output_type=output_type
            )
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
