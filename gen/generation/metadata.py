"""What each PNG says about how it was made: AUTOMATIC1111's "parameters" text (read by A1111, ComfyUI, civitai
and others) and a JSON chunk with everything needed to make the same image again (`gen reproduce`)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, PngImagePlugin

from gen.control import module as control_module
from gen.diffusion.samplers import SAMPLERS, sampler_name
from gen.generation.families import distilled_of, guidance_of
from gen.generation.options import hires_on
from gen.loading.assets import model_folder
from gen.loading.hashing import model_hash  # noqa: F401 (callers read it from here)

JSON_KEY = "gen"
A1111_KEY = "parameters"
# How far an image made again (another batch size, batch-mates, process count, `gen reproduce`) may differ, in
# 0-255 levels per channel: none where the CPU's matrix kernels do not depend on the batch shape or the thread
# count (AVX2 machines measured so), one level on a few pixels where they do (seen on an AVX-512 machine).
PIXEL_TOLERANCE = 1
# The JSON record's layout. 2: options.clip_skip in A1111's numbering (records without "format" held the
# pipeline's, one less); `read` turns older records into the current layout.
FORMAT = 2


def record(pipe, o, job, image, weights_hash: str, init=None, control=None) -> dict:
    """What the PNG of `job` (made with options `o` by `pipe`, from `init`'s image and mask if given) records: one
    function, so the CLI and the server write the same metadata and `gen reproduce` reads either."""
    sampler = sampler_name(pipe.scheduler)
    folder = model_folder(o.model or None)
    return {
        "format": FORMAT,
        "prompt": job.prompt,
        "seed": job.seed,
        "index": job.index,
        "options": o.to_dict(),
        "width": image.width,
        "height": image.height,
        "sampler": sampler,
        "guidance": guidance_of(pipe, o),  # as applied: the request's, else the model's own
        **({"distilled_guidance": distilled} if (distilled := distilled_of(pipe, o)) is not None else {}),
        "sampler_label": SAMPLERS[sampler].a1111 if sampler in SAMPLERS else sampler,
        "scheduler": dict(pipe.scheduler.config),
        "model_path": o.model,
        "model_name": folder.stem,
        "model_hash": weights_hash,
        "versions": versions(),
        "device": o.device,
        "dtype": o.dtype,
        **(init.hashes() if init is not None else {}),
        **(control.record() if control is not None else {}),
        **_first_pass(pipe, o),
    }


def _first_pass(pipe, o) -> dict:
    """Hires fix's first-pass size (A1111's "Size" is that one; the PNG itself is the upscaled size)."""
    if not hires_on(o):
        return {}
    return {"first_pass": {"width": o.width or pipe.default_size, "height": o.height or pipe.default_size}}


def _control_pairs(o: dict) -> dict:
    """sd-webui-controlnet's keys: "ControlNet K" -> its unit's settings, quoted."""
    out = {}
    for k, u in enumerate(o.get("control") or []):
        settings = {
            "Module": u["module"],
            "Model": Path(u["model"]).stem,
            "Weight": u["weight"],
            "Resize Mode": u["resize_mode"],
            "Processor Res": u["processor_res"],
            "Threshold A": _threshold(u, "a"),
            "Threshold B": _threshold(u, "b"),
            "Guidance Start": u["guidance_start"],
            "Guidance End": u["guidance_end"],
            "Pixel Perfect": u["pixel_perfect"],
            "Control Mode": u["control_mode"],
        }
        out[f"ControlNet {k}"] = '"' + ", ".join(f"{a}: {b}" for a, b in settings.items()) + '"'
    return out


def _threshold(unit: dict, which: str):
    """A unit's setting as it ran: given, else its module's default; -1 (A1111's "none") if it has none."""
    given, setting = unit[f"threshold_{which}"], getattr(control_module(unit["module"]), which)
    return given if given is not None else setting.default if setting is not None else -1


def a1111_parameters(record: dict) -> str:
    """A1111's three-line format: prompt, negative prompt, then "Key: value" pairs."""
    o = record["options"]
    size = record.get("first_pass") or record
    pairs = {
        "Steps": o["steps"],
        "Sampler": record["sampler_label"],
        "CFG scale": record.get("guidance", o["guidance"]),
        **({"Distilled CFG Scale": record["distilled_guidance"]} if "distilled_guidance" in record else {}),
        "Seed": record["seed"],
        "Size": f"{size['width']}x{size['height']}",
        "Model hash": record["model_hash"][:10],
        "Model": record["model_name"],
    }
    if (o.get("clip_skip") or 1) > 1:  # A1111's numbering, as options hold it; A1111 leaves 1 out too
        pairs["Clip skip"] = o["clip_skip"]
    if o.get("guidance_rescale"):
        pairs["CFG rescale"] = o["guidance_rescale"]
    if o.get("init_image"):  # A1111's img2img keys
        pairs["Denoising strength"] = o["strength"]
    if o.get("mask"):
        pairs["Mask blur"] = o["mask_blur"]
        if o.get("invert_mask"):
            pairs["Mask mode"] = "Inpaint not masked"
    pairs |= _hires_pairs(o, record)
    pairs |= _control_pairs(o)
    lines = [record["prompt"]]
    if o.get("negative"):
        lines.append(f"Negative prompt: {o['negative']}")
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs.items()))
    return "\n".join(lines)


def _hires_pairs(o: dict, record: dict) -> dict:
    """A1111's hires fix keys, where hires fix was on."""
    if "first_pass" not in record:
        return {}
    pairs = {"Denoising strength": o["hires_strength"]}
    if o.get("hires_width") or o.get("hires_height"):
        pairs["Hires resize"] = f"{record['width']}x{record['height']}"
    else:
        pairs["Hires upscale"] = f"{o['hires_scale']:g}"
    if o.get("hires_steps"):
        pairs["Hires steps"] = o["hires_steps"]
    pairs["Hires upscaler"] = o["hires_upscaler"]
    if o.get("hires_sampler"):
        pairs["Hires sampler"] = SAMPLERS[o["hires_sampler"]].a1111
    for key, name in (("hires_prompt", "Hires prompt"), ("hires_negative", "Hires negative prompt")):
        if o.get(key):
            pairs[name] = _quote(o[key])
    return pairs


def _quote(text: str) -> str:
    """A1111's infotext quoting: as is, unless a comma, colon or newline would break the "Key: value" list."""
    return text if not any(c in text for c in ",:\n") else json.dumps(text, ensure_ascii=False)


def _printable(text: str) -> str:
    # PNG text chunks are text: control characters (NUL above all) are dropped, newlines and tabs kept.
    return "".join(c for c in text if c in "\n\t" or ord(c) >= 32)


def png_info(record: dict, parameters: str | None = None) -> PngImagePlugin.PngInfo:
    """The PNG's two text chunks; `parameters`: A1111's text of `record` if the caller already made it."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt(A1111_KEY, _printable(parameters if parameters is not None else a1111_parameters(record)))
    info.add_itxt(JSON_KEY, json.dumps(record, sort_keys=True))  # JSON escapes control characters itself
    return info


def read(path: str | Path) -> dict:
    """The JSON record gen wrote into a PNG; ValueError if there is none."""
    try:
        with Image.open(path) as image:
            text = image.text.get(JSON_KEY) if hasattr(image, "text") else None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"{path}: not a readable PNG ({e})") from None
    if text is None:
        raise ValueError(f"{path}: has no gen metadata (was it made by gen?)")
    try:
        record = json.loads(text)
    except ValueError:
        raise ValueError(f"{path}: the gen metadata is not valid JSON") from None
    return current(record)


def current(record: dict) -> dict:
    """A record of any earlier format in the current one; "read_from_format" says which it was."""
    options = dict(record.get("options") or {})
    was = record.get("format", 1)
    if was < 2 and isinstance(options.get("clip_skip"), int):
        options["clip_skip"] += 1  # the pipeline's count of layers skipped, as A1111 numbers it
    return {**record, "options": options, "format": FORMAT, "read_from_format": was}


def versions() -> dict[str, str]:
    # Imported here: a record is written after a model loaded, and this module is read before (the CLI's
    # `reproduce --tolerance` default), where torch must not load yet.
    import diffusers
    import torch
    import transformers

    import gen

    return {
        "gen": gen.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
