"""Command-line flags made from a described dataclass (gen.generation.fields): the request's flags for `gen`, the
server's for `gen serve`. A field's help, default and choices are written once, where the field is."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from gen.generation.fields import Spec, base_type, label, specs


def add_flags(parser: argparse.ArgumentParser, cls: type, defaults: dict | None = None) -> None:
    """One flag per described field of `cls` (except `cli=False` ones); `defaults` overrides a field's default
    on the command line only (`gen serve --state-dir` defaults to the user's cache, the library to memory)."""
    defaults = defaults or {}
    for name, (field, spec, kind) in specs(cls).items():
        if not spec.cli:
            continue
        default = defaults.get(name, _default(field))
        flags = spec.flags or (f"--{label(name)}",)
        unset = default is None or default is False or default in ([], "")
        shown = "" if unset else " (default: %(default)s)"
        common: dict[str, Any] = {"dest": name, "help": spec.help + shown}
        if spec.metavar:
            common["metavar"] = spec.metavar
        base = base_type(kind)
        if base is bool:
            parser.add_argument(*flags, action="store_true", **common)
        elif base is list:
            parser.add_argument(*flags, action="append", default=None, type=_typed(spec, str), **common)
        else:
            typed = _typed(spec, base if base in (int, float) else str)
            parser.add_argument(*flags, default=default, type=typed, choices=spec.choices, **common)


def values(args: argparse.Namespace, cls: type, defaults: dict | None = None) -> dict:
    """The described fields' values from parsed flags; a repeatable flag never given takes its default."""
    defaults = defaults or {}
    out = {}
    for name, (field, spec, _) in specs(cls).items():
        if spec.cli:
            value = getattr(args, name)
            out[name] = defaults.get(name, _default(field)) if value is None and _is_list(field) else value
    return out


def _default(field) -> Any:
    return field.default_factory() if callable(field.default_factory) else field.default


def _is_list(field) -> bool:
    return callable(field.default_factory)


def _typed(spec: Spec, kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse's `type`: the field's own parser, else the plain type (so `--steps abc` stays argparse's
    "invalid int value")."""
    return kind if spec.parse is None else argparse_type(spec.parse)


def argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """A library parser as argparse's `type`: its ValueError's message becomes the flag's one-line error."""

    def typed(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    typed.__name__ = getattr(parse, "__name__", "value")
    return typed
