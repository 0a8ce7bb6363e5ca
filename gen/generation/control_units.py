"""ControlNet units: the request's ControlNets, one unit each, in the terms of A1111's sd-webui-controlnet (its
unit's fields, defaults and value names), so the command line (`--control model=...,image=...`), the A1111 API's
`alwayson_scripts.controlnet.args` and the jobs API describe a unit the same way.

Torch-free: units are checked with the rest of the request before anything loads. A unit's `image` names the
picture (a file for the CLI, the upload's hash-name on the server); the pictures themselves travel beside the
request as ControlPictures, as init images do (gen.generation.inputs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from gen.control import RESIZE_MODES, check_settings
from gen.generation.fields import base_type, check_value, label, option, specs

# A1111's names, with the pipeline's (gen.pipelines.controlnet.CONTROL_MODES) for each
CONTROL_MODES = {
    "Balanced": "balanced",
    "My prompt is more important": "prompt",
    "ControlNet is more important": "control",
}
HR_OPTIONS = ("Both", "Low res only", "High res only")  # which hires fix passes a unit steers
NO_INPAINT = "ControlNet with inpainting (a mask) is not supported; use an init image without a mask"

# What the command line may write for a value, beside A1111's names
SHORT = {
    "resize_mode": {
        "crop": "Crop and Resize",
        "just": "Just Resize",
        "resize": "Just Resize",
        "fill": "Resize and Fill",
    },
    "control_mode": {
        "balanced": "Balanced",
        "prompt": "My prompt is more important",
        "control": "ControlNet is more important",
    },
    "hr_option": {"both": "Both", "low": "Low res only", "high": "High res only"},
}
KEYS = {"start": "guidance_start", "end": "guidance_end", "mode": "control_mode", "resize": "resize_mode",
        "res": "processor_res", "a": "threshold_a", "b": "threshold_b", "hr": "hr_option"}  # fmt: skip


@dataclass
class ControlUnit:
    """One ControlNet and its control image, as sd-webui-controlnet's unit describes it."""

    model: str = option(
        "", "the ControlNet: a diffusers folder or an original-layout file (server: its name)"
    )
    image: str = option("", "the control image, or the picture `module` makes one from")
    module: str = option("none", "preprocessor making the control image (`gen control modules`)")
    weight: float = option(1.0, "how strongly the net steers", ge=0.0, le=2.0, finite=True)
    guidance_start: float = option(
        0.0, "the part of the schedule it steers: from", ge=0.0, le=1.0, finite=True
    )
    guidance_end: float = option(1.0, "... to", ge=0.0, le=1.0, finite=True)
    processor_res: int = option(512, "pixels on the short side the preprocessor works at", ge=64, le=4096)
    threshold_a: float | None = option(
        None, "the preprocessor's first setting (default: its own)", finite=True
    )
    threshold_b: float | None = option(None, "its second setting (default: its own)", finite=True)
    resize_mode: str = option("Crop and Resize", "how the control image is fitted", choices=RESIZE_MODES)
    pixel_perfect: bool = option(False, "preprocess at the resolution the image size needs")
    control_mode: str = option("Balanced", "prompt or ControlNet first", choices=tuple(CONTROL_MODES))
    hr_option: str = option("Both", "hires fix: which passes it steers", choices=HR_OPTIONS)

    def to_dict(self) -> dict:
        return asdict(self)


def check_unit(values: dict, k: int = 0) -> ControlUnit:
    """A unit from its fields (a dict as Options.control holds it), every value checked: ValueError naming the
    unit and the value."""
    known = {f.name for f in fields(ControlUnit)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"ControlNet unit {k}: unknown field {unknown[0]!r}; fields: {', '.join(sorted(known))}"
        )
    try:
        unit = ControlUnit(**values)
        for name, (_, spec, kind) in specs(ControlUnit).items():
            check_value(name, getattr(unit, name), spec, kind)
        for name in ("model", "image"):
            if not isinstance(getattr(unit, name), str) or not getattr(unit, name):
                raise ValueError(f"{name} is required")
        if unit.guidance_start >= unit.guidance_end:
            raise ValueError(
                f"guidance-start {unit.guidance_start:g} must be less than guidance-end {unit.guidance_end:g}"
            )
        check_settings(unit.module, unit.threshold_a, unit.threshold_b)
    except ValueError as e:
        raise ValueError(f"ControlNet unit {k}: {e}") from None
    return unit


def check_units(units: list) -> list[ControlUnit]:
    """The request's units (Options.control), each checked."""
    if not isinstance(units, list) or not all(isinstance(u, dict) for u in units):
        raise ValueError(f"control {units!r} must be a list of ControlNet units (field -> value)")
    return [check_unit(u, k) for k, u in enumerate(units)]


def parse_control(text: str) -> dict:
    """The command line's unit: KEY=VALUE pairs separated by commas (model=cn/,image=edges.png,module=canny,
    weight=0.8,start=0,end=0.6,mode=prompt,resize=fill,res=512,a=100,b=200,pixel_perfect=1,hr=low), every field
    of ControlUnit by its name or short key; a path holding a comma cannot be written here."""
    values: dict = {}
    for part in (p.strip() for p in text.split(",")):
        key, eq, value = part.partition("=")
        key = KEYS.get(key.strip(), key.strip().replace("-", "_"))
        if not eq or not key:
            raise ValueError(f"{part!r} in --control is not KEY=VALUE (e.g. model=cn/,image=edges.png)")
        values[key] = _typed(key, value.strip())
    return check_unit(values).to_dict()


def _typed(key: str, value: str):
    kinds = {name: kind for name, (_, _, kind) in specs(ControlUnit).items()}
    if key not in kinds:
        raise ValueError(f"unknown --control key {key!r}; keys: {', '.join([*kinds, *KEYS])}")
    if key in SHORT:
        return SHORT[key].get(value.lower(), value)
    kind = base_type(kinds[key])
    try:
        if kind is bool:
            return {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}[
                value.lower()
            ]
        return kind(value) if kind in (int, float) else value
    except (KeyError, ValueError):
        what = {bool: "true or false", int: "an integer", float: "a number"}[kind]
        raise ValueError(f"--control {label(key)}={value!r} must be {what}") from None
