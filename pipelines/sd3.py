"""Stable Diffusion 3 / 3.5 text-to-image: CLIP-L, CLIP-G and T5 conditioning diffusers' SD3Transformer2DModel
(joint attention over text and image tokens), sampled by flow matching. Called exactly like diffusers'
StableDiffusion3Pipeline; a plain prompt (no A1111 syntax) gives its images.

The text is read as diffusers reads it: each CLIP encoder's penultimate hidden states side by side, zero-padded to
T5's width, followed on the sequence axis by T5's (`max_sequence_length` tokens; zeros when the folder has no
text_encoder_3, as SD3 runs without T5), and the two CLIPs' pooled embeddings side by side. Where gen differs, as
for SD and SDXL: A1111's prompt syntax (weights and BREAK; gen.text.encode, gen.text.t5 for T5), CLIP prompts
longer than one window chunked instead of cut (as ComfyUI does), and `clip_skip` applied to the negative prompt
too (diffusers reads the negative's penultimate layer whatever clip_skip says).

The module path gen.pipelines.sd3.SD3TextToImagePipeline is written into saved pipelines' model_index.json.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.loaders import SD3LoraLoaderMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from gen.diffusion.guidance import guidance
from gen.pipelines.checks import check_clip_skip_layers
from gen.pipelines.flow import FlowMatchingPipeline
from gen.pipelines.flow_lora import FlowLoraMixin
from gen.text.encode import embed_penultimate, pad_chunks
from gen.text.t5 import embed_t5

Prompts = str | list[str] | None


def _listed(value: Prompts, fallback: list[str]) -> list[str]:
    """A per-encoder prompt: as given (a string for every row), else the fallback rows."""
    if value is None:
        return fallback
    return [value] * len(fallback) if isinstance(value, str) else list(value)


class SD3TextToImagePipeline(FlowLoraMixin, FlowMatchingPipeline, SD3LoraLoaderMixin):
    """Generate images from text with a Stable Diffusion 3 / 3.5 folder, as StableDiffusion3Pipeline does."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->transformer->vae"
    _optional_components = ["text_encoder_3", "tokenizer_3"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "pooled_prompt_embeds"]
    _lora_loader = SD3LoraLoaderMixin

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer_2: CLIPTokenizer,
        text_encoder_3: T5EncoderModel | None = None,
        tokenizer_3: T5TokenizerFast | None = None,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            text_encoder_3=text_encoder_3,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            tokenizer_3=tokenizer_3,
            transformer=transformer,
            scheduler=scheduler,
        )
        self._setup_processor()

    # -- text ---------------------------------------------------------------------------------------------------
    def encode_prompt(
        self,
        prompt: list[str],
        prompt_2: Prompts = None,
        prompt_3: Prompts = None,
        device: torch.device | None = None,
        clip_skip: int | None = None,
        max_sequence_length: int = 256,
        truncate: bool = False,
        weighting: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts (one row each; prompt_2/prompt_3 for the second CLIP and T5, default the same) -> the
        transformer's text tokens (B, K*L + max_sequence_length, D_T5) and pooled embedding (B, P_L + P_G); one
        call per encoder for the whole batch."""
        device = device or self._execution_device
        second, third = _listed(prompt_2, prompt), _listed(prompt_3, prompt)
        opts = {"clip_skip": clip_skip, "truncate": truncate, "weighting": weighting}
        rows_1, empty_1, pooled_1, _ = embed_penultimate(
            self.tokenizer, self.text_encoder, prompt, device, **opts
        )
        rows_2, empty_2, pooled_2, _ = embed_penultimate(
            self.tokenizer_2, self.text_encoder_2, second, device, **opts
        )
        length = empty_1.shape[0]
        chunks = max(r.shape[0] for r in rows_1 + rows_2) // length
        clip = torch.cat(
            [pad_chunks(rows_1, chunks, empty_1), pad_chunks(rows_2, chunks, empty_2)], dim=-1
        )  # (B, K*L, D_L + D_G)
        t5 = self._t5(third, device, max_sequence_length, weighting)  # (B, max_sequence_length, D_T5)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1])).to(self.text_encoder.dtype)
        return torch.cat([clip, t5], dim=-2), torch.cat([pooled_1, pooled_2], dim=-1)

    def _t5(self, prompts: list[str], device, max_sequence_length: int, weighting: bool) -> torch.Tensor:
        if self.text_encoder_3 is None:  # SD3 without T5: zeros in its place, as diffusers
            shape = (len(prompts), max_sequence_length, self.transformer.config.joint_attention_dim)
            return torch.zeros(shape, device=device, dtype=self.text_encoder.dtype)
        return embed_t5(
            self.tokenizer_3, self.text_encoder_3, prompts, device, max_sequence_length, weighting
        )

    def _text(self, prompt, negative_prompt, per_encoder: dict, given: dict, device, cfg: bool, **opts):
        """The prompts' and (with CFG) negatives' tokens and pooled embeddings, each row repeated per image;
        given embeddings stand in for either. One encoder call for prompts and negatives together."""
        rows = [prompt] if isinstance(prompt, str) else prompt
        batch = len(rows) if rows is not None else given["prompt_embeds"].shape[0]
        texts = [[], [], []]  # what each encoder reads: prompts' rows, then negatives'
        if rows is not None:
            texts = [rows, _listed(per_encoder["prompt_2"], rows), _listed(per_encoder["prompt_3"], rows)]
        encode_negatives = cfg and given["negative_prompt_embeds"] is None
        if encode_negatives:
            negatives = _listed(negative_prompt, [""] * batch)
            texts[0] = texts[0] + negatives
            texts[1] = texts[1] + _listed(per_encoder["negative_prompt_2"], negatives)
            texts[2] = texts[2] + _listed(per_encoder["negative_prompt_3"], negatives)
        embeds = pooled = None
        if texts[0]:
            with self._text_lora_scale():
                embeds, pooled = self.encode_prompt(texts[0], texts[1], texts[2], device, **opts)
        pos = (embeds[:batch], pooled[:batch]) if rows is not None else None
        pos = pos or (given["prompt_embeds"].to(device), given["pooled_prompt_embeds"].to(device))
        neg = None
        if encode_negatives:
            neg = (embeds[-batch:], pooled[-batch:])
        elif cfg:
            neg = (
                given["negative_prompt_embeds"].to(device),
                given["negative_pooled_prompt_embeds"].to(device),
            )
        return pos, neg

    # -- the call -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: Prompts = None,
        prompt_2: Prompts = None,
        prompt_3: Prompts = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.0,
        negative_prompt: Prompts = None,
        negative_prompt_2: Prompts = None,
        negative_prompt_3: Prompts = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int = 256,
        skip_guidance_layers: list[int] | None = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_stop: float = 0.2,
        skip_layer_guidance_start: float = 0.01,
        mu: float | None = None,
        truncate_long_prompts: bool = False,
        prompt_weighting: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """StableDiffusion3Pipeline's arguments and defaults (28 steps, guidance 7.0, the transformer's sample
        size), skip-layer guidance (SD3.5 Medium) included; gen's additions: `truncate_long_prompts` (cut CLIP
        prompts at one window instead of chunking) and `prompt_weighting` (A1111's (word:1.2), on by default).

        Steps: 1. check the inputs; 2. encode the prompts and negatives; 3. noise; 4. timesteps (shifted by the
        image size where the scheduler uses dynamic shifting); 5. denoise with guidance; 6. decode."""
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
        check_clip_skip_layers(clip_skip, (self.text_encoder, self.text_encoder_2), low=-1)
        device = self._begin(guidance_scale, joint_attention_kwargs)
        cfg = self.do_classifier_free_guidance

        # 2. Encode the prompts and negatives, each row repeated per image.
        pos, neg = self._text(
            prompt,
            negative_prompt,
            {
                "prompt_2": prompt_2,
                "prompt_3": prompt_3,
                "negative_prompt_2": negative_prompt_2,
                "negative_prompt_3": negative_prompt_3,
            },
            {
                "prompt_embeds": prompt_embeds,
                "pooled_prompt_embeds": pooled_prompt_embeds,
                "negative_prompt_embeds": negative_prompt_embeds,
                "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds,
            },
            device,
            cfg,
            clip_skip=clip_skip,
            max_sequence_length=max_sequence_length,
            truncate=truncate_long_prompts,
            weighting=prompt_weighting,
        )
        n = num_images_per_prompt
        embeds, pooled = (x.repeat_interleave(n, dim=0) for x in pos)  # (B, S, D), (B, P)
        state = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if cfg:  # negatives first, as diffusers batches them
            state = {
                "prompt_embeds": torch.cat([neg[0].repeat_interleave(n, dim=0), embeds]),
                "pooled_prompt_embeds": torch.cat([neg[1].repeat_interleave(n, dim=0), pooled]),
            }

        # 3. Noise.
        f = self.vae_scale_factor
        shape = (embeds.shape[0], self.transformer.config.in_channels, height // f, width // f)
        latents = self._initial_latents(shape, embeds.dtype, device, generator, latents)  # (B, C, h, w)

        # 4. Timesteps.
        if mu is None and self.scheduler.config.get("use_dynamic_shifting", None):
            patch = self.transformer.config.patch_size
            mu = self._mu((latents.shape[2] // patch) * (latents.shape[3] // patch), max_shift=1.16)
        steps = self._flow_timesteps(num_inference_steps, device, sigmas, mu)
        latents, steps = self._start(latents, steps)

        # 5. Denoise.
        skip = {
            "layers": skip_guidance_layers,
            "scale": skip_layer_guidance_scale,
            "range": (skip_layer_guidance_start, skip_layer_guidance_stop),
            "text": (embeds, pooled),
            "steps": self._inference_steps,  # as diffusers counts: a Heun step's two timesteps count two
        }
        self._step_index = 0

        def predict(x: torch.Tensor, t: torch.Tensor, state: dict) -> torch.Tensor:
            i, self._step_index = self._step_index, self._step_index + 1
            x_in = torch.cat([x, x]) if cfg else x  # (2B|B, C, h, w)
            pred = self._transformer(x_in, t, state["prompt_embeds"], state["pooled_prompt_embeds"])
            if not cfg:
                return pred
            pred_uncond, pred_text = pred.chunk(2)
            pred = guidance(pred_uncond, pred_text, self.guidance_scale)
            return self._skip_layer_guidance(pred, pred_text, x, t, i, skip)

        latents = self._flow_loop(
            latents, steps, predict, state, callback_on_step_end, tensor_inputs, generator
        )

        # 6. Decode.
        return self._finish(latents, generator, output_type, return_dict, self._overlay())

    def _transformer(self, x, t, context, pooled, **extra) -> torch.Tensor:
        return self.transformer(
            hidden_states=x,
            timestep=t.expand(x.shape[0]),
            encoder_hidden_states=context,
            pooled_projections=pooled,
            joint_attention_kwargs=self.joint_attention_kwargs,
            return_dict=False,
            **extra,
        )[0]

    def _skip_layer_guidance(self, pred, pred_text, x, t, i: int, skip: dict) -> torch.Tensor:
        """SD3.5's skip-layer guidance: inside (start, stop) of the schedule, away from the text branch run with
        `skip_guidance_layers` left out, as StableDiffusion3Pipeline does it."""
        start, stop = skip["range"]
        if skip["layers"] is None or not (skip["steps"] * start < i < skip["steps"] * stop):
            return pred
        skipped = self._transformer(x, t, *skip["text"], skip_layers=skip["layers"])
        return pred + (pred_text - skipped) * skip["scale"]
