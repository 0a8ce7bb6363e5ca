"""Prompt -> T5 encoder embeddings, for the flow-matching transformers (SD3's third encoder, Flux's second).

A prompt with no A1111 syntax is tokenized exactly as diffusers' StableDiffusion3Pipeline and FluxPipeline do
(padded to `max_sequence_length`, truncated there, EOS kept), so its embedding is theirs. With emphasis syntax,
`(word:1.2)` is parsed as on CLIP (gen.text.prompts) and applied the way Forge's T5 engine applies it, A1111's
"Original" emphasis: each token's embedding scaled by its weight, then the sequence's mean restored
(gen.text.encode's `_weighted`, the rule CLIP prompts follow too). diffusers reads the brackets as text; ComfyUI
instead interpolates from the empty prompt's embedding. BREAK has no meaning for T5 (one sequence): it is read as
a space.
"""

from __future__ import annotations

import logging

import torch

from gen.text.encode import _weighted
from gen.text.prompts import BREAK, parse

logger = logging.getLogger(__name__)


def _pieces(prompt: str, weighting: bool) -> list[tuple[str, float]]:
    """(text, weight) pieces, BREAK read as a space; one piece, the text as written, without weighting."""
    if not weighting:
        return [(prompt, 1.0)]
    pieces = [(" ", 1.0) if text == BREAK else (text, w) for text, w in parse(prompt)]
    if all(w == 1.0 for _, w in pieces):
        return [("".join(text for text, _ in pieces), 1.0)]
    return pieces


def _ids(tokenizer, prompt: str, length: int, weighting: bool) -> tuple[list[int], list[float], bool]:
    """One prompt's ids and weights, padded/truncated to `length` with EOS last, and whether it was cut."""
    pieces = _pieces(prompt, weighting)
    if len(pieces) == 1:  # the tokenizer's own call, as diffusers makes it
        full = tokenizer(pieces[0][0], add_special_tokens=True).input_ids
        ids, weights = full, [1.0] * len(full)
    else:
        ids, weights = [], []
        for text, w in pieces:
            piece = tokenizer(text, add_special_tokens=False).input_ids
            ids += piece
            weights += [w] * len(piece)
        ids.append(tokenizer.eos_token_id)
        weights.append(1.0)
    cut = len(ids) > length
    if cut:  # keep EOS, as truncation=True does
        ids, weights = ids[: length - 1] + [tokenizer.eos_token_id], weights[: length - 1] + [1.0]
    pad = length - len(ids)
    return ids + [tokenizer.pad_token_id] * pad, weights + [1.0] * pad, cut


def embed_t5(
    tokenizer,
    text_encoder,
    prompts: list[str],
    device: torch.device | str,
    max_sequence_length: int,
    weighting: bool = True,
) -> torch.Tensor:
    """(B, max_sequence_length, D) in the encoder's dtype: every prompt in one encoder call."""
    rows = [_ids(tokenizer, p, max_sequence_length, weighting) for p in prompts]
    for prompt, (_, _, cut) in zip(prompts, rows, strict=True):
        if cut:
            logger.warning(
                "The prompt is longer than max_sequence_length (%d T5 tokens); the rest was cut: %r",
                max_sequence_length,
                prompt,
            )
    ids = torch.tensor([r[0] for r in rows], device=device)  # (B, L)
    z = text_encoder(ids)[0]  # (B, L, D)
    return _weighted(z, [r[1] for r in rows]).to(dtype=text_encoder.dtype)
