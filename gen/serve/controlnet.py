"""sd-webui-controlnet's interface: the ControlNets under --controlnet-dir listed and found as that extension names
them ("name [hash]"), its units (`alwayson_scripts: {"controlnet": {"args": [unit, ...]}}`) read into the request's
ControlNet units (gen.generation.control_units) with their pictures decoded, and its routes:

    GET  /controlnet/version       {"version": 3}, the extension's API version
    GET  /controlnet/model_list    {"model_list": ["control_v11p_sd15_canny [d14c016b]", ...]}
    GET  /controlnet/module_list   {"module_list": [...], "module_detail": {name: {"model_free", "sliders"}}}
    GET  /controlnet/settings      {"control_net_unit_count": 3}
    POST /controlnet/detect        {"images": [b64, ...], "info": "Success"}: the preprocessors on pictures

A unit as the extension reads it: the deprecated `input_image` and `guidance` are `image` and `guidance_end`;
processor_res and thresholds of -1, or outside the module's range, take the module's defaults (the extension resets
them so); `resize_mode` and `control_mode` by name (or 0, 1, 2 as webuiapi's ControlNetUnit numbers its modes);
units with `enabled: false` are skipped. The weight-based preprocessors (openpose, depth, ...) are refused by name.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict

from gen.control import ALIASES, Setting, available, detect, module
from gen.generation.control_units import CONTROL_MODES, ControlUnit, check_unit
from gen.generation.inputs import ControlPictures, control_pictures
from gen.serve.models import find_controlnets
from gen.serve.results import decode_image, encode_png
from gen.serve.state import State
from gen.serve.tasks import ServeError

logger = logging.getLogger(__name__)

API_VERSION = 3  # what sd-webui-controlnet's /controlnet/version answers (its scripts/api.py)
RESOLUTION = Setting("Resolution", 512, 64, 2048)  # the extension's processor_res slider
OLD_RESIZE = {
    "inner fit (scale to fit)": "Crop and Resize",
    "scale to fit (inner fit)": "Crop and Resize",
    "outer fit (shrink to fit)": "Resize and Fill",
    "envelope (outer fit)": "Resize and Fill",
}
NUMBERED = {  # webuiapi and A1111's img2img number them
    "resize_mode": ("Just Resize", "Crop and Resize", "Resize and Fill"),
    "control_mode": tuple(CONTROL_MODES),
}


def resolve_model(nets: dict[str, str], name: str, k: int = 0) -> str:
    """A unit's model name -> its path, as the extension matches it: the full "name [hash]", else the name
    without its hash (any case), else the shortest name containing it; 422 naming the choices otherwise."""
    if name in nets:
        return nets[name]
    wanted = name.strip().lower()
    by_stem = {title.rsplit(" [", 1)[0].lower(): path for title, path in nets.items()}
    if wanted in by_stem:
        return by_stem[wanted]
    containing = sorted((t for t in nets if wanted and wanted in t.lower()), key=len)
    if containing and wanted != "none":
        return nets[containing[0]]
    choices = ", ".join(nets) or "none: start gen serve with --controlnet-dir DIR"
    raise ServeError(422, f"ControlNet unit {k}: model {name!r} not found; models: {choices}")


class DetectRequest(BaseModel):
    """The extension's /controlnet/detect body; webuiapi sends `controlnet_images`, the extension reads
    `controlnet_input_images`: either is taken."""

    model_config = ConfigDict(extra="ignore")

    controlnet_module: str = "none"
    controlnet_input_images: list[str] = []
    controlnet_images: list[str] = []
    controlnet_processor_res: int = -1
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1


def unit_values(raw: dict, k: int) -> dict | None:
    """An extension unit's fields in gen's terms (ControlUnit's), the picture left out; None when disabled."""
    if not isinstance(raw, dict):
        raise ServeError(422, f"ControlNet unit {k}: {raw!r} is not an object of unit fields")
    raw = dict(raw)
    for old, new in (("input_image", "image"), ("guidance", "guidance_end")):
        if old in raw and new not in raw:
            raw[new] = raw.pop(old)
    if raw.get("enabled") is False:
        return None
    fields = set(ControlUnit.__dataclass_fields__) - {"image"}
    values = {f: raw[f] for f in fields if raw.get(f) is not None}
    values["model"] = str(values.get("model", "None"))
    for name in ("resize_mode", "control_mode"):
        value = values.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 3:
            values[name] = NUMBERED[name][value]
        elif isinstance(value, str) and name == "resize_mode":
            values[name] = OLD_RESIZE.get(value.lower(), value)
    values["module"] = _module_name(str(values.get("module", "none")), k)
    _defaults_for_out_of_range(values)
    return values


def _module_name(name: str, k: int) -> str:
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    try:
        module(key)
    except ValueError as e:
        raise ServeError(422, f"ControlNet unit {k}: {e}") from None
    return key


def _defaults_for_out_of_range(values: dict) -> None:
    """-1 or a value outside the module's slider -> None (its default), as the extension resets them."""
    m = module(values["module"])
    for field, setting in (("threshold_a", m.a), ("threshold_b", m.b), ("processor_res", RESOLUTION)):
        value = values.get(field)
        if value is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or setting is None or not setting.low <= value <= setting.high:
            values.pop(field)


def read_units(state: State, scripts: dict | None, init_picture: str | None = None):
    """(the request's ControlNet units, their pictures) from A1111's alwayson_scripts; ([], None) without
    units. A unit without an image takes img2img's init image, as the extension does."""
    if not scripts:
        return [], None
    entry = next((v for key, v in scripts.items() if key.lower() == "controlnet"), None)
    raw_units = (entry or {}).get("args", []) if isinstance(entry, dict) else None
    if not isinstance(raw_units, list):
        raise ServeError(422, 'alwayson_scripts.controlnet must be {"args": [unit, ...]}')
    units, uploads = [], []
    for k, raw in enumerate(raw_units):
        values = unit_values(raw, k)
        if values is None:
            continue
        picture = _picture_of(raw, k) or init_picture
        if not picture:
            raise ServeError(422, f"ControlNet unit {k}: no image selected (give the unit an image)")
        units.append(values)
        uploads.append(picture)
    return checked_units(state, units, uploads)


def checked_units(state: State, units: list[dict], uploads: list[str]) -> tuple[list[dict], ControlPictures]:
    """Units with their models found under --controlnet-dir and their pictures decoded and hash-named; each
    unit checked (422 naming it)."""
    nets = state.controlnets
    decoded = []
    for k, (values, upload) in enumerate(zip(units, uploads, strict=True)):
        if str(values.get("model", "None")).strip().lower() in ("none", ""):
            raise ServeError(
                422, f"ControlNet unit {k}: no model selected; models: {', '.join(nets) or 'none'}"
            )
        values["model"] = resolve_model(nets, values["model"], k)
        try:
            decoded.append(decode_image(upload, state.config.max_pixels, f"ControlNet unit {k}'s image"))
        except ValueError as e:
            raise ServeError(422, " ".join(str(e).split())) from None
    if not units:
        return [], None
    pictures = control_pictures(decoded)
    for k, values in enumerate(units):
        values["image"] = f"upload-{pictures.hashes[k][:12]}.png"
        try:
            units[k] = check_unit(values, k).to_dict()
        except ValueError as e:
            raise ServeError(422, " ".join(str(e).split())) from None
    return units, pictures


def _picture_of(raw: dict, k: int) -> str | None:
    """A unit's image as the extension takes it: a base64 string, {"image": ..., "mask": ...}, or [image, mask];
    a mask (the inpaint modules') is refused."""
    image = raw.get("image", raw.get("input_image"))
    mask = raw.get("mask") or raw.get("mask_image")
    if isinstance(image, dict):
        image, mask = image.get("image"), image.get("mask") or mask
    elif isinstance(image, list) and image:
        image, mask = image[0], image[1] if len(image) > 1 else mask
    if mask:
        raise ServeError(422, f"ControlNet unit {k}: unit masks (the inpaint modules') are not supported")
    if image is not None and not isinstance(image, str):
        raise ServeError(422, f"ControlNet unit {k}: image must be a base64 picture or data: URL")
    return image or None


def module_list(alias_names: bool) -> dict:
    labels = {v: k for k, v in ALIASES.items()}
    names = available()
    shown = [labels.get(n, n) if alias_names else n for n in names]
    detail = {}
    for name, label in zip(names, shown, strict=True):
        m = module(name)
        sliders = [] if name == "none" else [_slider(RESOLUTION)]
        sliders += [_slider(s) for s in (m.a, m.b) if s is not None]
        detail[label] = {"model_free": False, "sliders": sliders}
    return {"module_list": shown, "module_detail": detail}


def _slider(s: Setting) -> dict:
    return {"name": s.name, "value": s.default, "min": s.low, "max": s.high}


def detect_images(body: DetectRequest, max_pixels: int) -> dict:
    """The preprocessor on each picture (processor_res and thresholds of -1: the module's defaults)."""
    pictures = body.controlnet_input_images or body.controlnet_images
    if not pictures:
        raise ServeError(422, "No image selected: give controlnet_input_images (base64 pictures)")
    values = {
        "module": _module_name(body.controlnet_module, 0),
        "processor_res": body.controlnet_processor_res,
        "threshold_a": body.controlnet_threshold_a,
        "threshold_b": body.controlnet_threshold_b,
    }
    _defaults_for_out_of_range(values)
    out = []
    for k, picture in enumerate(pictures):
        try:
            image = decode_image(picture, max_pixels, f"picture {k}")
        except ValueError as e:
            raise ServeError(422, " ".join(str(e).split())) from None
        made = detect(
            image,
            values["module"],
            values.get("threshold_a"),
            values.get("threshold_b"),
            None if values["module"] == "none" else values.get("processor_res", RESOLUTION.default),
        )
        out.append(encode_png(made))
    return {"images": out, "info": "Success"}


def router(state: State) -> APIRouter:
    api = APIRouter(prefix="/controlnet", tags=["ControlNet"])

    @api.get("/version")
    async def version():
        return {"version": API_VERSION}

    @api.get("/model_list")
    async def model_list(update: bool = True):
        if update:
            state.controlnets = find_controlnets(state.config.controlnet_dir)
        return {"model_list": list(state.controlnets)}

    @api.get("/module_list")
    async def modules(alias_names: bool = Query(False)):
        return module_list(alias_names)

    @api.get("/settings")
    async def settings():
        return {"control_net_unit_count": 3}

    @api.post("/detect")
    def detect_route(body: DetectRequest):  # sync: FastAPI runs it in a thread, off the event loop
        return detect_images(body, state.config.max_pixels)

    return api
