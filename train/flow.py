"""Training SD3 and Flux (flow matching) in gen's Trainer: the conditioning, the sigmas and the loss, as diffusers'
train_dreambooth_lora_sd3.py and train_dreambooth_lora_flux.py write them.

Rectified flow (Esser et al., "Scaling Rectified Flow Transformers", 2024): x_t = (1 - sigma) x_0 + sigma noise, and
the transformer predicts the velocity noise - x_0. Sigmas are drawn logit-normal (mean 0, std 1: the paper's and
diffusers' default weighting scheme) and shifted by the scheduler's `shift` as sampling shifts them, so training
spends its steps where sampling does. Flux-dev's guidance embedding gets diffusers' training default, 3.5.
"""

from __future__ import annotations

import torch

from gen.diffusion.training import diffusion_loss
from gen.generation.families import is_flux
from gen.pipelines.flux import image_ids, pack, unpack
from gen.train.common import TrainError


def check_options(o, processes: int = 1) -> None:
    """What the DDPM objective has and flow matching does not: refused in one line, not ignored."""
    for name, off in (
        ("min_snr_gamma", 0.0),
        ("noise_offset", 0.0),
        ("prediction_type", ""),
        ("zero_terminal_snr", False),
        ("cache_text", False),
    ):
        if getattr(o, name) != off:
            flag = "--" + name.replace("_", "-")
            raise TrainError(f"{flag} is for SD and gen's models; SD3/Flux train by flow matching without it")
    if o.train_text_encoder and processes > 1:
        # The pipeline's encode_prompt calls its own text encoder, not accelerate's wrapper: no gradient sync.
        raise TrainError("--train-text-encoder on SD3/Flux runs on one process here; drop it or use one GPU")


GUIDANCE = 3.5  # diffusers' --guidance_scale default for Flux-dev LoRA training


def conditioning(pipe, captions: list[str], device) -> dict[str, torch.Tensor]:
    """The transformer's text inputs for `captions`: tokens (B, S, D) and the pooled embedding (B, P); Flux's
    text positions too."""
    if is_flux(pipe):
        tokens, pooled, text_ids = pipe.encode_prompt(captions, device=device)
        return {"tokens": tokens, "pooled": pooled, "text_ids": text_ids}
    tokens, pooled = pipe.encode_prompt(captions, device=device)
    return {"tokens": tokens, "pooled": pooled}


def sample_sigmas(batch: int, shift: float, generator: torch.Generator, device) -> torch.Tensor:
    """(batch,) sigmas in (0, 1): logit-normal, then shifted as the scheduler's static shift spaces sampling."""
    u = torch.sigmoid(torch.randn(batch, generator=generator, device=device))
    return shift * u / (1 + (shift - 1) * u)


def flow_loss(
    pipe,
    model: torch.nn.Module,  # the transformer (as accelerate prepared it)
    latents: torch.Tensor,  # (B, C, h, w), scaled as the transformer reads them
    cond: dict[str, torch.Tensor],
    noise: torch.Tensor,  # (B, C, h, w)
    sigmas: torch.Tensor,  # (B,)
    sample_weights: torch.Tensor | None = None,  # (B,)
    pixel_weights: torch.Tensor | None = None,  # (B, 1, h, w)
) -> torch.Tensor:
    """The velocity loss at `sigmas`."""
    s = sigmas.view(-1, 1, 1, 1)
    x_t = (1 - s) * latents + s * noise  # (B, C, h, w)
    target = noise - latents
    if is_flux(pipe):
        b, _, h, w = x_t.shape
        guidance = None
        if pipe.transformer.config.guidance_embeds:
            guidance = torch.full((b,), GUIDANCE, device=x_t.device, dtype=torch.float32)
        pred = model(
            hidden_states=pack(x_t),
            timestep=sigmas,
            guidance=guidance,
            pooled_projections=cond["pooled"],
            encoder_hidden_states=cond["tokens"],
            txt_ids=cond["text_ids"],
            img_ids=image_ids(h, w, x_t.device, x_t.dtype),
            return_dict=False,
        )[0]
        pred = unpack(pred, h, w)
    else:
        pred = model(
            hidden_states=x_t,
            timestep=sigmas * 1000,
            encoder_hidden_states=cond["tokens"],
            pooled_projections=cond["pooled"],
            return_dict=False,
        )[0]
    return diffusion_loss(pred, target, sample_weights, pixel_weights)
