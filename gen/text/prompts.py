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
    open_round: list[int] = []  # index into pieces where each still-open "(" began
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in _TOKEN.finditer(prompt):
        if m["escape"]:
            pieces.append([m["escape"][1], 1.0])
        elif m["open"]:
            (open_round if m["open"] == "(" else open_square).append(len(pieces))
        elif m["weight"] and open_round:
            scale(open_round.pop(), float(m["value"]))
        elif m["close"] == ")" and open_round:
            scale(open_round.pop(), ROUND)
        elif m["close"] == "]" and open_square:
            scale(open_square.pop(), SQUARE)
        else:  # plain text, or a stray closer / weight with nothing open: kept as text
            for i, part in enumerate(_BREAK.split(m.group(0))):
                if i:
                    pieces.append([BREAK, -1.0])
                pieces.append([part, 1.0])
    for start in open_round:
        scale(start, ROUND)
    for start in open_square:
        scale(start, SQUARE)
    return _merge(pieces) or [("", 1.0)]


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
    per_chunk = length - 2
    pieces = parse(prompt) if weighting else [(prompt, 1.0)]
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
    chunks: list[list[tuple[int, float]]] = []
    for group in groups:
        chunks += [group[i : i + per_chunk] for i in range(0, len(group), per_chunk)] or [[]]
    cut: list[int] = []
    if truncate and len(chunks) > 1:
        cut = [i for chunk in chunks[1:] for i, _ in chunk]
        chunks = chunks[:1]
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
