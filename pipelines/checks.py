"""The pipeline's input checks: every bad value refused before any work, with the value and the rule.

One function per concern (sizes, step and image counts, guidance, prompts and embeddings, clip skip, outputs),
called in that order by `check_call`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gen.text.encode import ClipSkip

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_call(
    pipe,
    *,
    prompt,
    negative_prompt,
    height: int,
    width: int,
    num_inference_steps: int,
    guidance_scale: float,
    guidance_rescale: float = 0.0,
    prompt_embeds=None,
    negative_prompt_embeds=None,
    output_type: str = "pil",
    callback_on_step_end_tensor_inputs: list[str] | None = None,
    num_images_per_prompt: int = 1,
    guidance_interval: tuple[float, float] | None = None,
    clip_skip: ClipSkip = None,
) -> None:
    """Refuse bad input before any work, naming the value and the rule."""
    check_size(pipe, height, width)
    check_counts(num_inference_steps, num_images_per_prompt)
    check_guidance(guidance_scale, guidance_rescale, guidance_interval)
    check_prompts(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
    check_clip_skip(pipe, clip_skip)
    check_outputs(pipe, output_type, callback_on_step_end_tensor_inputs)


def check_size(pipe, height: int, width: int) -> None:
    stride = pipe.latent_stride
    for name, size in (("height", height), ("width", width)):
        if not isinstance(size, int) or size < stride or size % stride:
            near = max(stride, stride * round(size / stride)) if isinstance(size, (int, float)) else stride
            raise ValueError(
                f"{name}={size!r} must be a positive multiple of {stride} (VAE factor {pipe.vae_scale_factor}"
                f" x patch size {stride // pipe.vae_scale_factor}); nearest valid: {near}"
            )


def check_counts(num_inference_steps: int, num_images_per_prompt: int) -> None:
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps!r} must be an integer >= 1")
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt={num_images_per_prompt!r} must be an integer >= 1")


def check_guidance(scale: float, rescale: float, interval: tuple[float, float] | None) -> None:
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"guidance_scale={scale!r} must be a finite number >= 0")
    if not math.isfinite(rescale) or not 0 <= rescale <= 1:
        raise ValueError(f"guidance_rescale={rescale!r} must be between 0 and 1")
    if interval is None:
        return
    ok = isinstance(interval, (tuple, list)) and len(interval) == 2
    if not ok or not 0 <= interval[0] < interval[1] <= 1:
        raise ValueError(
            f"guidance_interval={interval!r} must be (start, end) with 0 <= start < end <= 1, fractions of the"
            " schedule"
        )


def check_prompts(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds) -> None:
    _check_prompt(prompt, prompt_embeds)
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("give negative_prompt or negative_prompt_embeds, not both")
    n_prompts = (
        1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
    )
    if isinstance(negative_prompt, list) and len(negative_prompt) != n_prompts:
        raise ValueError(
            f"negative_prompt has {len(negative_prompt)} entries but prompt has {n_prompts}; give one per prompt"
            " or a single string"
        )
    _check_embeds_match(prompt_embeds, negative_prompt_embeds)


def _check_prompt(prompt, prompt_embeds) -> None:
    """Exactly one of the prompt and its embeddings, the prompt of a kind the encoder takes."""
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("give prompt or prompt_embeds, not both")
    if prompt is None and prompt_embeds is None:
        raise ValueError("give a prompt (str or list of str) or prompt_embeds")
    if prompt is not None and not _is_prompt(prompt):
        raise ValueError(f"prompt must be a str or a non-empty list of str, got {type(prompt).__name__}")


def _check_embeds_match(prompt_embeds, negative_prompt_embeds) -> None:
    # CFG stacks the two in one batch, so they must be the same shape.
    both = prompt_embeds is not None and negative_prompt_embeds is not None
    if both and prompt_embeds.shape != negative_prompt_embeds.shape:
        raise ValueError(
            f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds"
            f" {tuple(negative_prompt_embeds.shape)} must have the same shape"
        )


def check_clip_skip(pipe, clip_skip: ClipSkip) -> None:
    """clip_skip counts layers before the one a pipeline reads by default: an SD encoder's last (then its final
    layer norm), each SDXL encoder's penultimate (no norm), as diffusers counts. At least one layer must stay, and
    on SDXL -1 reads the last layer. SDXL also takes a pair, one value (or None) per encoder: A1111's "Clip skip
    SDXL" reads the first encoder's layer alone."""
    if clip_skip is None:
        return
    encoders = {"text_encoder": pipe.text_encoder}
    if pipe.is_sdxl:
        encoders["text_encoder_2"] = pipe.text_encoder_2
    for value, (name, encoder) in zip(_per_encoder(clip_skip, len(encoders)), encoders.items(), strict=True):
        if value is not None:
            _check_layers(value, clip_skip, name, encoder, low=-1 if pipe.is_sdxl else 0)


def check_clip_skip_layers(clip_skip, encoders: tuple, low: int = 0) -> None:
    """One clip_skip for several encoders read from their penultimate layer (SD3's two CLIPs; -1: the last)."""
    if clip_skip is None:
        return
    for i, encoder in enumerate(encoders):
        _check_layers(clip_skip, clip_skip, f"text_encoder{'_' + str(i + 1) if i else ''}", encoder, low)


def _per_encoder(clip_skip, encoders: int) -> tuple:
    if not isinstance(clip_skip, (tuple, list)):
        return (clip_skip,) * encoders
    if encoders == 1:
        raise ValueError(
            f"clip_skip={clip_skip!r}: one value per text encoder is for SDXL's two; this pipeline has one text"
            " encoder, give an int"
        )
    if len(clip_skip) != encoders:
        raise ValueError(f"clip_skip={clip_skip!r} must be an int, or a pair (first encoder, second) on SDXL")
    return tuple(clip_skip)


def _check_layers(value, clip_skip, name: str, encoder, low: int) -> None:
    """One encoder's value: an integer from `low`, leaving at least one of the encoder's layers."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"clip_skip={clip_skip!r} must be an integer (layers skipped) or None")
    layers = getattr(getattr(encoder, "config", None), "num_hidden_layers", None)  # None: no encoder loaded
    high = None if layers is None else layers - 1 + low  # SD: layers - 1; SDXL (from the penultimate): - 2
    if high is not None and not low <= value <= high:
        raise ValueError(f"clip_skip={value!r} must be between {low} and {high}: {name} has {layers} layers")
    if value < low:
        raise ValueError(f"clip_skip={value!r} must be >= {low}")


def _is_prompt(prompt) -> bool:
    return isinstance(prompt, str) or (
        isinstance(prompt, list) and bool(prompt) and all(isinstance(p, str) for p in prompt)
    )


def check_outputs(pipe, output_type: str, tensor_inputs: list[str] | None) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type={output_type!r} is not one of {list(OUTPUT_TYPES)}")
    bad = [k for k in tensor_inputs or [] if k not in pipe._callback_tensor_inputs]
    if bad:
        raise ValueError(f"callback_on_step_end_tensor_inputs {bad} not in {pipe._callback_tensor_inputs}")


def check_strength(strength: float, num_inference_steps: int, timesteps=None, sigmas=None) -> None:
    """Image-to-image and inpainting: strength in [0, 1], and enough of it that at least one step runs."""
    if not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise ValueError(
            f"strength={strength!r} must be between 0 and 1 (0 keeps the image, 1 repaints it fully)"
        )
    count = (
        len(timesteps)
        if timesteps is not None
        else len(sigmas)
        if sigmas is not None
        else num_inference_steps
    )
    if int(count * strength) < 1:
        least = math.ceil(1000 / count) / 1000
        raise ValueError(
            f"strength={strength} of {count} steps runs no denoising step (int({count} x {strength}) = 0);"
            f" use strength >= {least} or more steps"
        )


def check_control(unet, nets: list, images: list, scales: list, starts: list, ends: list) -> None:
    """ControlNet inputs: a net per image, a scale and a [start, end) per net within the schedule, and nets made for
    this UNet's base (the text width it attends to, SDXL's added conditioning)."""
    n = len(nets)
    for what, values in (("control images", images), ("controlnet_conditioning_scale", scales)):
        if len(values) != n:
            raise ValueError(f"{what}: {len(values)} given for {n} ControlNet(s); give one per net")
    for what, values in (("control_guidance_start", starts), ("control_guidance_end", ends)):
        if len(values) != n:
            raise ValueError(f"{what}: {len(values)} values for {n} ControlNet(s); give one per net")
    for k, scale in enumerate(scales):
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"controlnet_conditioning_scale {scale!r} (net {k}) must be a finite number")
    for k, (start, end) in enumerate(zip(starts, ends, strict=True)):
        if not 0 <= start < end <= 1:
            raise ValueError(
                f"control_guidance_start={start} and control_guidance_end={end} (net {k}) must satisfy"
                " 0 <= start < end <= 1"
            )
    for k, net in enumerate(nets):
        check_base(unet, net, k)
        if (net.dtype, net.device) != (unet.dtype, unet.device):
            raise ValueError(
                f"ControlNet {k} is {net.dtype} on {net.device} but the UNet is {unet.dtype} on {unet.device};"
                " load it with the pipeline's torch_dtype, or .to() the pipeline after adding it"
            )


def check_base(unet, net, k: int) -> None:
    """A ControlNet of another base (an SD 1.5 net on SDXL) fails deep inside the UNet; name both instead."""

    def base(config) -> str:
        xl = getattr(config, "addition_embed_type", None) == "text_time"
        return f"{'SDXL' if xl else 'SD'} (text width {config.cross_attention_dim})"

    same = unet.config.cross_attention_dim == net.config.cross_attention_dim and getattr(
        unet.config, "addition_embed_type", None
    ) == getattr(net.config, "addition_embed_type", None)
    if not same:
        raise ValueError(
            f"ControlNet {k} was made for {base(net.config)}, but this pipeline's UNet is {base(unet.config)};"
            " use a ControlNet trained for this base model"
        )
