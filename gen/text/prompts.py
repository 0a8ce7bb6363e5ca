"""AUTOMATIC1111's prompt syntax: emphasis weights, BREAK, and 75-token chunks for prompts of any length.

Syntax (as A1111 documents it): `(text)` multiplies attention by 1.1, `((text))` by 1.21, `[text]` divides by 1.1,
`(text:1.3)` sets the factor, `\\(` `\\)` `\\[` `\\]` are literal brackets, a bracket left open applies to the
rest of the prompt, and `BREAK` starts a new chunk. Adjacent pieces of equal weight are merged.

A chunk is the text encoder's whole context window: BOS, up to `window - 2` tokens, EOS, padding. The window is
the tokenizer's `model_max_length` (77 for SD's CLIP: 75-token chunks; 248 for Long-CLIP; 32 for diffusers'
tiny test encoders), never a literal, so any CLIP checkpoint chunks the way its own pipeline pads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROUND, SQUARE = 1.1, 1 / 1.1
# transformers gives tokenizers saved without a length this sentinel (int(1e30)); no CLIP context is that long.
_UNSET = 1_000_000

# One alternative per kind of piece; order matters (escapes first, the weight closer before a plain ")").
_TOKEN = re.compile(
    r"(?P<escape>\\[()\[\]\\])"
    r"|(?P<weight>:\s*(?P<value>[+-]?[.\d]+)\s*\))"
    r"|(?P<open>[(\[])"
    r"|(?P<close>[)\]])"
    r"|(?P<text>\\|[^\\()\[\]:]+|:)"
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
BREAK = "BREAK"


def parse(prompt: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) pieces; ("BREAK", -1) marks a forced chunk boundary."""
    pieces: list[list] = []
    # Index into pieces where each still-open bracket began, by kind: a closer only ends a bracket of its kind.
    opened: dict[str, list[int]] = {"(": [], "[": []}
    for m in _TOKEN.finditer(prompt):
        if m["escape"]:
            pieces.append([m["escape"][1], 1.0])
        elif m["open"]:
            opened[m["open"]].append(len(pieces))
        elif not _close(m, pieces, opened):  # plain text, or a stray closer / weight with nothing open
            _add_text(pieces, m.group(0))
    # A bracket left open applies to the rest of the prompt, as A1111 reads it.
    for start in opened["("]:
        _scale(pieces, start, ROUND)
    for start in opened["["]:
        _scale(pieces, start, SQUARE)
    return _merge(pieces) or [("", 1.0)]


def _scale(pieces: list[list], start: int, factor: float) -> None:
    for piece in pieces[start:]:
        piece[1] *= factor


def _close(m: re.Match, pieces: list[list], opened: dict[str, list[int]]) -> bool:
    """Weight the pieces since the matching bracket opened, for a closer or a `:weight)`; False (the match is
    then text) when it is neither, or when no bracket of its kind is open."""
    kind = "[" if m["close"] == "]" else "("  # a weight closes a round bracket
    if not (m["weight"] or m["close"]) or not opened[kind]:
        return False
    factor = float(m["value"]) if m["weight"] else ROUND if kind == "(" else SQUARE
    _scale(pieces, opened[kind].pop(), factor)
    return True


def _add_text(pieces: list[list], text: str) -> None:
    # BREAK inside the text starts a new chunk; it is only recognised as a whole word.
    for i, part in enumerate(_BREAK.split(text)):
        if i:
            pieces.append([BREAK, -1.0])
        pieces.append([part, 1.0])


def _merge(pieces: list[list]) -> list[tuple[str, float]]:
    out: list[list] = []
    for text, weight in pieces:
        if out and out[-1][1] == weight and weight != -1.0:
            out[-1][0] += text
        else:
            out.append([text, weight])
    return [(t, w) for t, w in out if t or w == -1.0]


def window(tokenizer, positions: int | None = None) -> int:
    """Ids per chunk, BOS and EOS included: the tokenizer's model_max_length, capped by the text encoder's
    position table (`positions`, its config's max_position_embeddings) when that is shorter."""
    length = tokenizer.model_max_length
    if positions:
        length = min(length, positions)
    if length >= _UNSET or length < 3:
        raise ValueError(
            f"the tokenizer's model_max_length is {length!r}; set it to the text encoder's context length"
            " (77 for SD's CLIP), at least 3"
        )
    return int(length)


@dataclass
class Chunks:
    """Token ids and weights per chunk, each chunk BOS + up to window - 2 tokens + EOS, padded to the window."""

    ids: list[list[int]]
    weights: list[list[float]]
    cut: list[int]  # tokens dropped by truncation (empty when chunking)
    lengths: list[int]  # BOS + tokens + EOS per chunk, before padding


def tokenize_weighted(
    tokenizer, prompt: str, truncate: bool = False, weighting: bool = True, length: int | None = None
) -> Chunks:
    """Prompt -> chunks of `length` ids (default: window(tokenizer)) with per-token weights (A1111's layout:
    BOS, tokens, EOS, padding)."""
    length = length or window(tokenizer)
    pieces = parse(prompt) if weighting else [(prompt, 1.0)]
    chunks = _split(_groups(tokenizer, pieces), length - 2)
    cut: list[int] = []
    if truncate and len(chunks) > 1:
        cut = [i for chunk in chunks[1:] for i, _ in chunk]
        chunks = chunks[:1]
    return _layout(tokenizer, chunks, length, cut)


def _groups(tokenizer, pieces: list[tuple[str, float]]) -> list[list[tuple[int, float]]]:
    """(token id, weight) runs, a new run at each BREAK; each piece is tokenized on its own, as A1111 does."""
    groups: list[list[tuple[int, float]]] = [[]]
    for text, weight in pieces:
        if weight == -1.0:  # BREAK
            groups.append([])
            continue
        ids = (
            tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
            if text
            else []
        )
        groups[-1].extend((i, weight) for i in ids)
    return groups


def _split(groups: list[list[tuple[int, float]]], per_chunk: int) -> list[list[tuple[int, float]]]:
    # An empty run (an empty prompt, or BREAK twice) is still one chunk.
    chunks: list[list[tuple[int, float]]] = []
    for group in groups:
        chunks += [group[i : i + per_chunk] for i in range(0, len(group), per_chunk)] or [[]]
    return chunks


def _layout(tokenizer, chunks: list[list[tuple[int, float]]], length: int, cut: list[int]) -> Chunks:
    """Each chunk as BOS, tokens, EOS, padding to `length`, weight 1 outside the tokens."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    ids, weights, lengths = [], [], []
    for chunk in chunks:
        row = [bos] + [i for i, _ in chunk] + [eos]
        w = [1.0] + [x for _, x in chunk] + [1.0]
        ids.append(row + [pad] * (length - len(row)))
        weights.append(w + [1.0] * (length - len(w)))
        lengths.append(len(row))
    return Chunks(ids, weights, cut, lengths)


def explain(tokenizer, prompt: str, truncate: bool = False, weighting: bool = True) -> str:
    """The tokenizer made visible: each chunk's tokens with their weights, and whatever would be cut."""
    chunks = tokenize_weighted(tokenizer, prompt, truncate, weighting)
    per_chunk = window(tokenizer) - 2
    lines = []
    if weighting:
        pieces = parse(prompt)
        lines.append("pieces: " + "  ".join("BREAK" if w == -1 else f"{t!r}x{w:.3g}" for t, w in pieces))
    for k, (ids, weights, length) in enumerate(zip(chunks.ids, chunks.weights, chunks.lengths, strict=True)):
        used = length - 2
        words = []
        for i, w in zip(ids[1 : length - 1], weights[1 : length - 1], strict=True):
            token = tokenizer.convert_ids_to_tokens(i).replace("</w>", "_")
            words.append(token if w == 1 else f"{token}({w:.3g})")
        lines.append(f"chunk {k + 1}: {used}/{per_chunk} tokens: " + " ".join(words))
    if chunks.cut:
        lines.append(f"cut ({len(chunks.cut)} tokens): {tokenizer.decode(chunks.cut)!r}")
    return "\n".join(lines)
