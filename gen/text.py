"""Prompt -> token embeddings for the denoiser's cross-attention.

The tokenizer and text encoder are transformers' CLIP classes; this module owns how they are called, so the
pipeline, the training code and the CLI all turn text into embeddings the same way.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def tokenize(tokenizer, prompts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Pad/truncate to the tokenizer's window; warn with the text that was cut."""
    max_length = max_length or tokenizer.model_max_length
    batch = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )
    full = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if full.shape[-1] > max_length:
        cut = tokenizer.batch_decode(full[:, max_length - 1 : -1], skip_special_tokens=True)
        cut = [c for c in cut if c.strip()]
        if cut:
            logger.warning(
                "The prompt is longer than the %d-token window; this part was cut: %s", max_length, cut
            )
    return batch


def encode(
    tokenizer,
    text_encoder,
    prompts: list[str],
    device: torch.device | str,
    clip_skip: int | None = None,
    max_length: int | None = None,
) -> torch.Tensor:
    """Embed prompts: (B, L, D_text). `clip_skip=k` takes the output k layers before the last (then final LN)."""
    batch = tokenize(tokenizer, prompts, max_length)
    ids = batch.input_ids.to(device)  # (B, L)
    # Models trained with masks (a config flag) must be called with them; CLIP's own are not.
    mask = (
        batch.attention_mask.to(device) if getattr(text_encoder.config, "use_attention_mask", False) else None
    )
    if clip_skip is None:
        return text_encoder(ids, attention_mask=mask)[0]  # (B, L, D_text)
    out = text_encoder(ids, attention_mask=mask, output_hidden_states=True)
    hidden = out.hidden_states[-(clip_skip + 1)]  # (B, L, D_text)
    return final_layer_norm(text_encoder)(hidden)


def final_layer_norm(text_encoder) -> torch.nn.Module:
    # transformers 5 flattened CLIPTextModel (no `.text_model`); 4.x nests it.
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm
