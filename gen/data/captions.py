"""Captions for shapes scenes as people write them, and the prompt styles the evaluation asks in.

Training captions name any subset of a scene's attributes, in varied order and words: "a red circle on a blue
background", "red circle, blue background", "a big red circle in the middle", "a circle in red", "a shape on a
white background". What a caption leaves out is whatever the scene happens to hold, so the model learns that an
unnamed attribute may be anything. The evaluation's paraphrases are templates this grammar never produces
(`training_captions` enumerates everything it can say; a test keeps the two apart), so their score measures
generalisation to new phrasings, not recall of trained ones.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gen.data import scenes as S
from gen.data.scenes import Scene

SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
STYLES = ("template", "short", "minimal", "paraphrased")
# Which attributes each style names (the judge scores only these, plus "one clean shape").
NAMED = {
    "template": ("background", "colour", "shape", "size", "position"),
    "short": ("background", "colour", "shape"),
    "minimal": ("colour", "shape"),
    "paraphrased": ("background", "colour", "shape"),
}
# Held-out phrasings: none of these can come out of `caption` (tested).
PARAPHRASES = (
    "{colour} {shape} on a {background} background",
    "a {shape} in {colour} on {background}",
    "on a {background} background, a {colour} {shape}",
    "the {colour} {shape} on a {background} background",
)

Pick = Callable[..., object]  # pick(options, weights=None) -> one option


def where_phrases(position: str) -> tuple[str, ...]:
    if position == "centre":
        return ("in the centre", "in the center", "in the middle")
    vertical, horizontal = position.split()
    other = {"top": "upper", "bottom": "lower"}[vertical]
    return (
        f"in the {position}",
        f"in the {other} {horizontal}",
        f"at the {position}",
        f"in the {position} corner",
    )


def canonical(scene: Scene) -> str:
    """Every attribute, in the one fixed phrasing: the evaluation's "template" style."""
    where = "in the centre" if scene.position == "centre" else f"in the {scene.position}"
    return f"a {scene.size} {scene.colour} {scene.shape} {where} on a {scene.background} background"


@dataclass(frozen=True)
class _Words:
    """A caption's chosen words; an empty one is left out."""

    size: str
    where: str
    background: str
    colour: str
    noun: str
    on: str  # " on a red background", " on red" or ""

    @property
    def thing(self) -> str:
        return " ".join(w for w in (self.size, self.colour, self.noun) if w)

    @property
    def at(self) -> str:
        return f" {self.where}" if self.where else ""


def _compose(scene: Scene, pick: Pick) -> str:
    """One training caption; every random decision goes through `pick`, so the grammar can be enumerated."""
    w = _words(scene, pick)
    form = pick(("plain", "where last", "with", "comma", "where first", "in colour"), (3, 1, 1, 2, 1, 1))
    out = _FORMS[form](w)
    return _plain(w) if out is None else out  # a form that needs a word the caption left out: the plain one


def _words(scene: Scene, pick: Pick) -> _Words:
    # The order of the picks is the grammar's: `training_captions` enumerates them as they come.
    size = pick(("", pick(SIZE_WORDS[scene.size])), (0.65, 0.35))
    where = pick(("", pick(where_phrases(scene.position))), (0.6, 0.4))
    background = pick((scene.background, ""), (0.8, 0.2))
    colour = pick((scene.colour, ""), (0.95, 0.05))
    noun = pick((scene.shape, "shape"), (0.95, 0.05))
    on = pick((f" on a {background} background", f" on {background}"), (0.7, 0.3)) if background else ""
    return _Words(size, where, background, colour, noun, on)


def _plain(w: _Words) -> str:
    return f"a {w.thing}{w.at}{w.on}"


def _where_last(w: _Words) -> str:
    return f"a {w.thing}{w.on}{w.at}"


def _with(w: _Words) -> str | None:
    return f"a {w.background} background with a {w.thing}{w.at}" if w.background else None


def _comma(w: _Words) -> str:
    parts = (
        [w.thing] + ([f"{w.background} background"] if w.background else []) + ([w.where] if w.where else [])
    )
    return ", ".join(parts)


def _where_first(w: _Words) -> str | None:
    return f"{w.where}, a {w.thing}{w.on}" if w.where else None


def _in_colour(w: _Words) -> str | None:
    if not w.colour or w.noun == "shape":  # "a shape in red" would not name the shape
        return None
    sized = f"{w.size} {w.noun}" if w.size else w.noun
    on = f" on a {w.background} background" if w.background else ""
    return f"a {sized} in {w.colour}{w.at}{on}"


_FORMS: dict[str, Callable[[_Words], str | None]] = {
    "plain": _plain,
    "where last": _where_last,
    "with": _with,
    "comma": _comma,
    "where first": _where_first,
    "in colour": _in_colour,
}


def caption(scene: Scene, rng: random.Random | None = None) -> str:
    """A training caption drawn with `rng`; rng=None gives the canonical one."""
    if rng is None:
        return canonical(scene)

    def pick(options: Sequence, weights: Sequence[float] | None = None):
        return rng.choices(options, weights)[0]

    return _compose(scene, pick)


def training_captions(scene: Scene) -> set[str]:
    """Everything `caption` can say about this scene: each path through the grammar's decisions once."""
    out: set[str] = set()
    stack: list[list[int]] = [[]]
    while stack:
        path = stack.pop()
        widths: list[int] = []

        def pick(options: Sequence, weights=None, path=path, widths=widths):
            k = path[len(widths)] if len(widths) < len(path) else 0
            widths.append(len(options))
            return options[k]

        out.add(_compose(scene, pick))
        for j in range(len(path), len(widths)):
            stack += [path + [0] * (j - len(path)) + [k] for k in range(1, widths[j])]
    return out


def prompt(scene: Scene, style: str, rng: random.Random) -> str:
    """The evaluation's prompt for a scene in one style (see NAMED for what each names)."""
    if style == "template":
        return canonical(scene)
    if style == "short":
        return f"a {scene.colour} {scene.shape} on a {scene.background} background"
    if style == "minimal":
        return f"a {scene.colour} {scene.shape}"
    if style == "paraphrased":
        return rng.choice(PARAPHRASES).format(
            colour=scene.colour, shape=scene.shape, background=scene.background
        )
    raise ValueError(f"prompt style {style!r} must be one of {list(STYLES)}")


def vocabulary() -> set[str]:
    """Every word a caption or evaluation prompt may use (to keep their token embeddings when pruning)."""
    words = {"a", "the", "in", "on", "at", "with", "background", "shape", "corner", "sks", ","}
    words |= (
        {w for pair in SIZE_WORDS.values() for w in pair} | set(S.COLOURS) | set(S.SHAPES + S.EXTRA_SHAPES)
    )
    words |= {w for p in S.POSITIONS for phrase in where_phrases(p) for w in phrase.split()}
    return words
