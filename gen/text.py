"""Prompt -> token embeddings for the denoiser's cross-attention.

The tokenizer and text encoder are transformers' CLIP classes; this module owns how they are called, so the
pipeline, the training code and the CLI all turn text into embeddings the same way. Prompts use A1111's syntax
(gen.prompts): emphasis weights, BREAK, and any length — long prompts are split into 75-token chunks, each
encoded with its own BOS/EOS, and the chunks concatenated along the sequence axis (cross-attention takes any
length). A prompt of at most 75 tokens with no weights gives exactly what plain CLIP tokenization gives.
"""

from __future__ import annotations

import logging

import torch

from gen.prompts import Chunks, tokenize_weighted

logger = logging.getLogger(__name__)


def final_layer_norm(text_encoder) -> torch.nn.Module:
    # transformers 5 flattened CLIPTextModel (no `.text_model`); 4.x nests it.
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm


def _run(text_encoder, ids: torch.Tensor, mask: torch.Tensor | None, clip_skip: int | None) -> torch.Tensor:
    if clip_skip is None:
        return text_encoder(ids, attention_mask=mask)[0]  # (K, 77, D)
    out = text_encoder(ids, attention_mask=mask, output_hidden_states=True)
    return final_layer_norm(text_encoder)(out.hidden_states[-(clip_skip + 1)])  # (K, 77, D)


def _weighted(z: torch.Tensor, weights: list[list[float]]) -> torch.Tensor:
    """A1111's emphasis: scale each token's embedding by its weight, then restore the chunk's mean."""
    w = torch.tensor(weights, device=z.device, dtype=z.dtype)  # (K, 77)
    if not bool((w != 1).any()):
        return z
    mean = z.mean(dim=(1, 2), keepdim=True)  # (K, 1, 1)
    z = z * w[..., None]
    return z * (mean / z.mean(dim=(1, 2), keepdim=True))


def embed_chunks(
    text_encoder, chunked: list[Chunks], device, clip_skip: int | None = None
) -> list[torch.Tensor]:
    """Every chunk of every prompt through the text encoder in one call; per prompt (K_i*77, D), weighted."""
    ids = torch.tensor([row for c in chunked for row in c.ids], device=device)  # (sum K, 77)
    mask = None
    config = getattr(
        text_encoder, "module", text_encoder
    ).config  # `module`: wrapped for distributed training
    if getattr(config, "use_attention_mask", False):
        # Models trained with masks (a config flag) must be called with them; CLIP's own are not.
        lengths = torch.tensor([n for c in chunked for n in c.lengths], device=device)
        mask = (torch.arange(ids.shape[1], device=device)[None] < lengths[:, None]).long()
    z = _run(text_encoder, ids, mask, clip_skip)  # (sum K, 77, D)
    out, at = [], 0
    for c in chunked:
        k = len(c.ids)
        out.append(_weighted(z[at : at + k], c.weights).reshape(-1, z.shape[-1]))  # (K*77, D)
        at += k
    return out


def encode_chunks(text_encoder, chunks: Chunks, device, clip_skip: int | None = None) -> torch.Tensor:
    """One prompt's chunks -> (K*77, D)."""
    return embed_chunks(text_encoder, [chunks], device, clip_skip)[0]


def encode(
    tokenizer,
    text_encoder,
    prompts: list[str],
    device: torch.device | str,
    clip_skip: int | None = None,
    min_chunks: int = 1,
    truncate: bool = False,
    weighting: bool = True,
) -> torch.Tensor:
    """Embed prompts: (B, 77*K, D), K the most chunks any prompt needs (at least `min_chunks`); shorter prompts
    are padded with the embedding of an empty chunk, as A1111 pads the negative prompt."""
    chunked = [tokenize_weighted(tokenizer, p, truncate, weighting) for p in prompts]
    for c in chunked:
        if c.cut:
            text = tokenizer.decode(c.cut)
            logger.warning("The prompt is longer than CLIP's 75-token window; this part was cut: %r", text)
    k = max([min_chunks] + [len(c.ids) for c in chunked])
    pad = any(len(c.ids) < k for c in chunked)
    extra = [tokenize_weighted(tokenizer, "", weighting=False)] if pad else []
    rows = embed_chunks(text_encoder, chunked + extra, device, clip_skip)
    if pad:
        empty = rows.pop()
        rows = [torch.cat([r, empty.repeat(k - r.shape[0] // 77, 1)]) for r in rows]
    return torch.stack(rows)  # (B, 77*K, D)
