"""Flux.1 (dev, schnell) text-to-image: CLIP-L's pooled embedding and T5's tokens conditioning diffusers'
FluxTransformer2DModel (rotary positions over text and 2x2-packed image tokens, a distilled guidance embedding),
sampled by flow matching. Called exactly like diffusers' FluxPipeline; a plain prompt (no A1111 syntax) gives
its images.

`guidance_scale` is Flux-dev's distilled guidance, an input of the transformer (ignored by schnell, whose config
has no guidance embedding): one transformer call per step. `true_cfg_scale` > 1 with a negative prompt runs real
classifier-free guidance, a second call on the negative, combined by the one formula (gen.diffusion.guidance).
Where gen differs from diffusers: A1111's prompt syntax (weights on T5 as Forge applies them: gen.text.t5; the
pooled CLIP embedding reads the prompt with the syntax removed), and sizes that do not fit the packing (multiples
of 16 for the usual VAE) are refused with the nearest valid size rather than silently resized.

The module path gen.pipelines.flux.FluxTextToImagePipeline is written into saved pipelines' model_index.json.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.loaders import FluxLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from gen.diffusion.guidance import guidance
from gen.pipelines.checks import check_guidance
from gen.pipelines.flow import FlowMatchingPipeline
from gen.pipelines.flow_lora import FlowLoraMixin
from gen.text.encode import first_window
from gen.text.t5 import embed_t5

Prompts = str | list[str] | None


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, h/2 * w/2, 4C) tokens: each 2x2 patch one token, as Flux reads them."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """pack undone: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Each packed token's rotary position (0, row, column): (h/2 * w/2, 3)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def _rows(value: Prompts, fallback: list[str] | None = None) -> list[str] | None:
    if value is None:
        return fallback
    if isinstance(value, str):
        return [value] * (len(fallback) if fallback else 1)
    return list(value)


class FluxTextToImagePipeline(FlowLoraMixin, FlowMatchingPipeline, FluxLoraLoaderMixin):
    """Generate images from text with a Flux.1 folder, as FluxPipeline does."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"
    comfy_timesteps = 10_000  # ComfyUI's ModelSamplingFlux table (SD3's has 1000)
    _optional_components: list[str] = []
    _callback_tensor_inputs = ["latents", "prompt_embeds"]
    _lora_loader = FluxLoraLoaderMixin

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: T5TokenizerFast,
        transformer: FluxTransformer2DModel,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
            scheduler=scheduler,
        )
        self._setup_processor(pack=2)

    def _tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) as the transformer reads them: packed 2x2 into tokens."""
        return pack(latents)

    @property
    def latent_stride(self) -> int:
        """Pixels per packed token: the VAE's factor times the 2x2 packing."""
        return self.vae_scale_factor * 2

    @property
    def default_size(self) -> int:
        """1024 for the usual VAE: diffusers' default sample size of 128 latents (the transformer has none)."""
        return 128 * self.vae_scale_factor

    # -- text ---------------------------------------------------------------------------------------------------
    def encode_prompt(
        self,
        prompt: list[str],
        prompt_2: Prompts = None,
        device: torch.device | None = None,
        max_sequence_length: int = 512,
        weighting: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompts (one row each; prompt_2 for T5, default the same) -> T5's tokens (B, max_sequence_length, D),
        CLIP's pooled embedding (B, P) and the text tokens' positions (max_sequence_length, 3), as FluxPipeline's
        encode_prompt returns them."""
        device = device or self._execution_device
        ids = torch.tensor(
            first_window(self.tokenizer, self.text_encoder, prompt, weighting), device=device
        )  # (B, L): the first window, as diffusers truncates
        pooled = self.text_encoder(ids, output_hidden_states=False).pooler_output.to(self.text_encoder.dtype)
        t5 = embed_t5(
            self.tokenizer_2,
            self.text_encoder_2,
            _rows(prompt_2, prompt),
            device,
            max_sequence_length,
            weighting,
        )
        dtype = self.text_encoder.dtype
        return t5, pooled, torch.zeros(t5.shape[1], 3, device=device, dtype=dtype)

    def _text(self, prompt, prompt_2, embeds, pooled, device, **opts):
        if embeds is not None:
            dtype = self.text_encoder.dtype
            return (
                embeds.to(device),
                pooled.to(device),
                torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype),
            )
        with self._text_lora_scale():
            return self.encode_prompt(_rows(prompt), prompt_2, device, **opts)

    # -- the call -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: Prompts = None,
        prompt_2: Prompts = None,
        negative_prompt: Prompts = None,
        negative_prompt_2: Prompts = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int = 512,
        prompt_weighting: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """FluxPipeline's arguments and defaults (28 steps, guidance 3.5, 1024x1024); `latents`, if given, are
        packed, (B, h/2 * w/2, 4C), as FluxPipeline takes them. gen's addition: `prompt_weighting`.

        Steps: 1. check the inputs; 2. encode the prompt (and the negative, for true CFG); 3. noise, packed;
        4. sigmas shifted by the image size; 5. denoise; 6. unpack and decode."""
        height = height or self.default_size
        width = width or self.default_size
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        # 1. Check the inputs.
        self._check_flow(
            prompt=prompt,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt,
            output_type=output_type,
            tensor_inputs=tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        check_guidance(true_cfg_scale, 0.0, None)
        device = self._begin(guidance_scale, joint_attention_kwargs)
        has_negative = negative_prompt is not None or negative_prompt_embeds is not None
        true_cfg = true_cfg_scale > 1 and has_negative

        # 2. Encode the prompt, and the negative for true CFG; each row repeated per image.
        opts = {"max_sequence_length": max_sequence_length, "weighting": prompt_weighting}
        n = num_images_per_prompt
        embeds, pooled, text_ids = self._text(
            prompt, prompt_2, prompt_embeds, pooled_prompt_embeds, device, **opts
        )
        state = {"prompt_embeds": embeds.repeat_interleave(n, dim=0)}
        pooled = pooled.repeat_interleave(n, dim=0)
        negative = None
        if true_cfg:
            rows = _rows(negative_prompt, [""] * embeds.shape[0]) if negative_prompt_embeds is None else None
            neg = self._text(
                rows, negative_prompt_2, negative_prompt_embeds, negative_pooled_prompt_embeds, device, **opts
            )
            negative = (neg[0].repeat_interleave(n, dim=0), neg[1].repeat_interleave(n, dim=0), neg[2])

        # 3. Noise, packed 2x2 into tokens.
        f = self.vae_scale_factor
        h, w = 2 * (height // (f * 2)), 2 * (width // (f * 2))
        channels = self.transformer.config.in_channels // 4
        batch = state["prompt_embeds"].shape[0]
        dtype = state["prompt_embeds"].dtype
        if latents is None:
            latents = pack(self._initial_latents((batch, channels, h, w), dtype, device, generator))
        else:
            latents = self._initial_latents((batch, channels, h, w), dtype, device, generator, latents)
        ids = image_ids(h, w, device, dtype)  # (h/2 * w/2, 3)

        # 4. Sigmas, shifted by the number of image tokens (FluxPipeline's linear sigmas unless the scheduler
        # makes its own: use_flow_sigmas, or one like FlowMatchHeun that takes no sigmas, where diffusers fails).
        own = self.scheduler.config.get("use_flow_sigmas", False)
        own = own or (sigmas is None and not self.accepts("sigmas"))
        if own:
            sigmas = None
        elif sigmas is None and not hasattr(self.scheduler, "schedule_sigmas"):
            # (a named schedule places its own steps: _flow_timesteps)
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        steps = self._flow_timesteps(num_inference_steps, device, sigmas, self._mu(latents.shape[1], 1.15))
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        latents, steps = self._start(latents, steps)

        # 5. Denoise.
        distilled = None
        if self.transformer.config.guidance_embeds:
            distilled = torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(batch)

        def predict(x: torch.Tensor, t: torch.Tensor, state: dict) -> torch.Tensor:
            timestep = t.expand(x.shape[0]).to(x.dtype) / 1000
            pred = self._transformer(x, timestep, distilled, state["prompt_embeds"], pooled, text_ids, ids)
            if negative is None:
                return pred
            pred_negative = self._transformer(
                x, timestep, distilled, negative[0], negative[1], negative[2], ids
            )
            return guidance(pred_negative, pred, true_cfg_scale)

        latents = self._flow_loop(
            latents, steps, predict, state, callback_on_step_end, tensor_inputs, generator
        )

        # 6. Unpack and decode.
        if output_type == "latent":
            return self._finish(latents, generator, output_type, return_dict, self._overlay())
        return self._finish(unpack(latents, h, w), generator, output_type, return_dict, self._overlay())

    def _transformer(self, x, timestep, distilled, context, pooled, text_ids, ids) -> torch.Tensor:
        return self.transformer(
            hidden_states=x,
            timestep=timestep,
            guidance=distilled,
            pooled_projections=pooled,
            encoder_hidden_states=context,
            txt_ids=text_ids,
            img_ids=ids,
            joint_attention_kwargs=self.joint_attention_kwargs,
            return_dict=False,
        )[0]
