"""How a request field is described once: its help, bounds, choices and command-line spelling, read by the
checks (gen.generation.options), the CLI's flags (gen.cli.flags) and the HTTP schemas (gen.serve.schema).

Torch-free and argparse-free: the library holds the description, the front-ends turn it into their own forms.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Spec:
    """One field's description. `ge`/`le` bound numbers; `finite` refuses nan and inf; `choices` lists the
    allowed values; `flags` are the CLI's names (default: --the-field-name); `parse` turns CLI text into the
    value (argparse's `type`); `cli=False` keeps a field off the command line; `hint` ends an upper-bound error."""

    help: str
    flags: tuple[str, ...] = ()
    ge: float | None = None
    le: float | None = None
    finite: bool = False
    choices: tuple | None = None
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None
    cli: bool = True
    hint: str = ""


def option(default: Any, help: str, **spec: Any) -> Any:
    """A dataclass field with its Spec. Lists and dicts get a fresh copy per instance."""
    meta = {"spec": Spec(help, **spec)}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def spec_of(field: dataclasses.Field) -> Spec | None:
    return field.metadata.get("spec")


def specs(cls: type) -> dict[str, tuple[dataclasses.Field, Spec, Any]]:
    """Every described field of a dataclass: name -> (field, spec, type hint)."""
    hints = typing.get_type_hints(cls)
    return {f.name: (f, spec_of(f), hints[f.name]) for f in dataclasses.fields(cls) if spec_of(f) is not None}


def label(name: str) -> str:
    """A field's name as users type it on the command line (num_images -> num-images)."""
    return name.replace("_", "-")


def check_value(name: str, value: Any, spec: Spec, kind: Any) -> None:
    """A value against its field's Spec: ValueError naming the field, the value and what is allowed."""
    if value is None:
        return
    if spec.choices is not None and value not in spec.choices:
        raise ValueError(f"{label(name)} {value!r} must be one of {list(spec.choices)}")
    if base_type(kind) is bool and not isinstance(value, bool):
        raise ValueError(f"{label(name)} {value!r} must be true or false")
    if base_type(kind) is int:
        _check_int(name, value, spec)
    elif base_type(kind) is float:
        _check_float(name, value, spec)


def _check_int(name: str, value: Any, spec: Spec) -> None:
    """Bounded whole numbers (an unbounded int field's rule is its own, e.g. A1111's Clip skip)."""
    if spec.ge is None and spec.le is None:
        return
    whole = isinstance(value, int) and not isinstance(value, bool)
    if spec.ge is not None and spec.le is not None and spec.hint == "":
        if not whole or not spec.ge <= value <= spec.le:
            raise ValueError(f"{label(name)} {value!r} must be an integer from {spec.ge} to {spec.le}")
        return
    if not whole or (spec.ge is not None and value < spec.ge):
        raise ValueError(f"{label(name)} {value!r} must be an integer >= {spec.ge}")
    if spec.le is not None and value > spec.le:
        raise ValueError(f"{label(name)} {value} is more than {spec.le}{spec.hint}")


def _check_float(name: str, value: Any, spec: Spec) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or (spec.finite and not math.isfinite(value)):
        raise ValueError(f"{label(name)} {value!r} must be a finite number")
    low, high = spec.ge, spec.le
    if (low is not None and value < low) or (high is not None and value > high):
        what = "a finite number" if spec.finite else "a number"
        if low is not None and high is not None:
            raise ValueError(f"{label(name)} {value!r} must be {what} from {low:g} to {high:g}")
        bound = f">= {low:g}" if low is not None else f"<= {high:g}"
        raise ValueError(f"{label(name)} {value!r} must be {what} {bound}")


def base_type(kind: Any) -> Any:
    """`int | None` -> int; `tuple[float, float] | None` -> tuple; plain types as they are."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    return typing.get_origin(kind) or kind
