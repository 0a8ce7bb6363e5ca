"""Prompt -> token embeddings for the denoiser's cross-attention.

The tokenizer and text encoder are transformers' CLIP classes; this module owns how they are called, so the
pipeline, the training code and the CLI all turn text into embeddings the same way. Prompts use A1111's syntax
(gen.text.prompts): emphasis weights, BREAK, and any length — long prompts are split into chunks of the encoder's
window (L = 77 for SD: 75 tokens + BOS/EOS), each encoded on its own, and the chunks concatenated along the
sequence axis (cross-attention takes any length). A prompt that fits one window with no weights gives exactly
what plain CLIP tokenization gives.

Prompts of one batch are padded to a common number of chunks K with the embedding of an empty chunk, the one
rule for that (`pad_chunks`), used by the pipeline and the trainer.
"""

from __future__ import annotations

import logging

import torch

from gen.text.prompts import Chunks, tokenize_weighted, window

logger = logging.getLogger(__name__)

# Layers skipped before the one a pipeline reads by default (see gen.pipelines.checks.check_clip_skip); on SDXL a
# pair gives each of its two encoders its own.
ClipSkip = int | tuple[int | None, int | None] | None


def final_layer_norm(text_encoder) -> torch.nn.Module:
    # transformers 5 flattened CLIPTextModel (no `.text_model`); 4.x nests it.
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm


def _run(text_encoder, ids: torch.Tensor, mask: torch.Tensor | None, clip_skip: int | None) -> torch.Tensor:
    if clip_skip is None:
        return text_encoder(ids, attention_mask=mask)[0]  # (K, L, D)
    out = text_encoder(ids, attention_mask=mask, output_hidden_states=True)
    return final_layer_norm(text_encoder)(out.hidden_states[-(clip_skip + 1)])  # (K, L, D)


def _weighted(z: torch.Tensor, weights: list[list[float]]) -> torch.Tensor:
    """A1111's emphasis: scale each token's embedding by its weight, then restore the chunk's mean."""
    w = torch.tensor(weights, device=z.device, dtype=z.dtype)  # (K, L)
    if not bool((w != 1).any()):
        return z
    mean = z.mean(dim=(1, 2), keepdim=True)  # (K, 1, 1)
    z = z * w[..., None]
    return z * (mean / z.mean(dim=(1, 2), keepdim=True))


def chunk_length(tokenizer, text_encoder=None) -> int:
    """L: ids per chunk, from the tokenizer's model_max_length and the encoder's position table."""
    config = getattr(getattr(text_encoder, "module", text_encoder), "config", None)
    return window(tokenizer, getattr(config, "max_position_embeddings", None))


def embed_chunks(
    text_encoder, chunked: list[Chunks], device, clip_skip: int | None = None
) -> list[torch.Tensor]:
    """Every chunk of every prompt through the text encoder in one call; per prompt (K_i*L, D), weighted."""
    ids = torch.tensor([row for c in chunked for row in c.ids], device=device)  # (sum K, L)
    mask = None
    # `module`: wrapped for distributed training
    config = getattr(text_encoder, "module", text_encoder).config
    if getattr(config, "use_attention_mask", False):
        # Models trained with masks (a config flag) must be called with them; CLIP's own are not.
        lengths = torch.tensor([n for c in chunked for n in c.lengths], device=device)
        mask = (torch.arange(ids.shape[1], device=device)[None] < lengths[:, None]).long()
    z = _run(text_encoder, ids, mask, clip_skip)  # (sum K, L, D)
    out, at = [], 0
    for c in chunked:
        k = len(c.ids)
        out.append(_weighted(z[at : at + k], c.weights).reshape(-1, z.shape[-1]))  # (K*L, D)
        at += k
    return out


def encode_chunks(text_encoder, chunks: Chunks, device, clip_skip: int | None = None) -> torch.Tensor:
    """One prompt's chunks -> (K*L, D)."""
    return embed_chunks(text_encoder, [chunks], device, clip_skip)[0]


def embed(
    tokenizer,
    text_encoder,
    prompts: list[str],
    device: torch.device | str,
    clip_skip: int | None = None,
    truncate: bool = False,
    weighting: bool = True,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each prompt's own chunks, unpadded, (K_i*L, D), and the empty chunk's embedding (L, D) to pad with;
    one text-encoder call for all of them."""
    chunked = _chunked(tokenizer, text_encoder, prompts, truncate, weighting)  # the empty prompt's last
    rows = embed_chunks(text_encoder, chunked, device, clip_skip)  # one call: the empty chunk too
    return rows[:-1], rows[-1]


def _chunked(tokenizer, text_encoder, prompts: list[str], truncate: bool, weighting: bool) -> list[Chunks]:
    """Each prompt's chunks, then the empty prompt's; a warning shows what truncation cut."""
    length = chunk_length(tokenizer, text_encoder)
    chunked = [
        tokenize_weighted(tokenizer, p, truncate=truncate, weighting=weighting, length=length)
        for p in prompts
    ]
    for c in chunked:
        if c.cut:
            logger.warning(
                "The prompt is longer than the text encoder's %d-token window; this part was cut: %r",
                length - 2,
                tokenizer.decode(c.cut),
            )
    return [*chunked, tokenize_weighted(tokenizer, "", truncate=False, weighting=False, length=length)]


def first_window(tokenizer, text_encoder, prompts: list[str], weighting: bool = True) -> list[list[int]]:
    """Each prompt's first window of ids (BOS, tokens, EOS, padding), A1111's syntax removed: what a pooled-only
    reading of a prompt takes (Flux's CLIP), as a truncating tokenizer call gives for a plain prompt."""
    return [c.ids[0] for c in _chunked(tokenizer, text_encoder, prompts, True, weighting)[:-1]]


def _penultimate(
    text_encoder, chunked: list[Chunks], device, clip_skip: int | None
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """SDXL's reading of one encoder: the hidden states `clip_skip` layers before the penultimate (-1: the last
    layer; no final layer norm), weighted, per prompt (K_i*L, D); and each prompt's pooled embedding from its
    first chunk (the projected one of a CLIPTextModelWithProjection; None for a plain CLIPTextModel)."""
    ids = torch.tensor([row for c in chunked for row in c.ids], device=device)  # (sum K, L)
    out = text_encoder(ids, output_hidden_states=True)
    z = out.hidden_states[-(clip_skip or 0) - 2]  # (sum K, L, D)
    first = out[0] if out[0].ndim == 2 else None  # (sum K, P): text_embeds
    rows, pooled, at = [], [], 0
    for c in chunked:
        k = len(c.ids)
        rows.append(_weighted(z[at : at + k], c.weights).reshape(-1, z.shape[-1]))
        if first is not None:
            pooled.append(first[at])
        at += k
    return rows, torch.stack(pooled) if pooled else None


def embed_penultimate(
    tokenizer,
    text_encoder,
    prompts: list[str],
    device: torch.device | str,
    clip_skip: int | None = None,
    truncate: bool = False,
    weighting: bool = True,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One CLIP encoder read as SDXL and SD3 read theirs (see _penultimate): each prompt's chunks (K_i*L, D), the
    empty chunk (L, D), each prompt's pooled embedding (B, P) and the empty prompt's (P); one encoder call."""
    chunked = _chunked(tokenizer, text_encoder, prompts, truncate, weighting)
    rows, pooled = _penultimate(text_encoder, chunked, device, clip_skip)
    if pooled is None:
        return rows[:-1], rows[-1], None, None
    return rows[:-1], rows[-1], pooled[:-1], pooled[-1]


def embed_sdxl(
    tokenizers: tuple,
    text_encoders: tuple,
    prompts: list[str],
    prompts_2: list[str],
    device: torch.device | str,
    clip_skip: ClipSkip = None,
    truncate: bool = False,
    weighting: bool = True,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """SDXL's two encoders, A1111's way: both read every chunk of their prompt (prompts_2 for the second), and a
    chunk's embedding is the two encoders' penultimate hidden states side by side, (L, D1 + D2).

    Returns each prompt's chunks (K_i*L, D1+D2) (the encoder needing fewer chunks padded with its empty chunk),
    the empty chunk (L, D1+D2), each prompt's pooled embedding (B, P) — the second encoder's, of the prompt's
    first chunk, as A1111 takes it (diffusers truncates the prompt to one window, which gives the same) —
    and the empty prompt's pooled embedding (P). `clip_skip` applies to both encoders, or a pair to each its own."""
    skips = tuple(clip_skip) if isinstance(clip_skip, (tuple, list)) else (clip_skip, clip_skip)
    read = [
        _penultimate(encoder, _chunked(tokenizer, encoder, texts, truncate, weighting), device, skip)
        for tokenizer, encoder, texts, skip in zip(
            tokenizers, text_encoders, (prompts, prompts_2), skips, strict=True
        )
    ]
    (rows_1, _), (rows_2, pooled) = read
    if pooled is None:
        raise ValueError(
            "SDXL's second text encoder must give a pooled embedding (CLIPTextModelWithProjection)"
        )
    length = rows_1[-1].shape[0]
    if rows_2[-1].shape[0] != length:
        raise ValueError(
            f"SDXL's tokenizers have different windows ({length} and {rows_2[-1].shape[0]} tokens); they must match"
        )
    joined = []
    for a, b in zip(rows_1[:-1], rows_2[:-1], strict=True):
        k = max(a.shape[0], b.shape[0]) // length
        joined.append(
            torch.cat([pad_chunks([a], k, rows_1[-1])[0], pad_chunks([b], k, rows_2[-1])[0]], dim=-1)
        )
    return joined, torch.cat([rows_1[-1], rows_2[-1]], dim=-1), pooled[:-1], pooled[-1]


def pad_chunks(rows: list[torch.Tensor], chunks: int, empty: torch.Tensor) -> torch.Tensor:
    """Stack prompts of K_i*L tokens as (B, chunks*L, D), appending the empty chunk's embedding, as A1111 pads
    the negative prompt to the prompt's length."""
    length = empty.shape[0]
    return torch.stack(
        [torch.cat([r.to(empty), empty.repeat(chunks - r.shape[0] // length, 1)]) for r in rows]
    )


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
    """Embed prompts: (B, L*K, D), K the most chunks any prompt needs (at least `min_chunks`), shorter prompts
    padded with the empty chunk (pad_chunks)."""
    rows, empty = embed(
        tokenizer, text_encoder, prompts, device, clip_skip=clip_skip, truncate=truncate, weighting=weighting
    )
    k = max([min_chunks] + [r.shape[0] // empty.shape[0] for r in rows])
    return pad_chunks(rows, k, empty)  # (B, L*K, D)
