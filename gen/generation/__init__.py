"""The generation core every front-end calls: options in, images and their metadata out.

options.py    THE REQUEST (Options): every field's default, bounds and help once; its rules; the job plan
fields.py     how a field is described (Spec), read by the checks, the CLI's flags and the HTTP schemas
inputs.py     init images and masks for image-to-image and inpainting, ControlNet units' pictures: read,
              checked, hashed (torch-free)
control_units.py  ControlNet units in sd-webui-controlnet's terms, the CLI's --control syntax (torch-free)
controlnets.py    the units at render time: nets loaded once, control images per pass size, call arguments
upscale.py    upscalers by A1111's names and hires fix's sizes (torch-free)
hires.py      hires fix: first pass, upscale (latents or pixels), image-to-image at the larger size
core.py       load and prepare a pipeline, check a request against it once, render batches, gen.generate
clip_skip.py  A1111's Clip skip number and which encoders it applies to, as the pipelines take it
families.py   the request per model family: the model's own CFG scale, Flux's two guidances, what SD3/Flux
              cannot do yet, each family's call arguments
metadata.py   what each PNG records, and how far an image made again may differ

Importing this package loads no torch: core's names load on first use.
"""

from __future__ import annotations

import importlib

from gen.generation.options import (
    ATTENTION,
    MAX_SEED,
    PRECISIONS,
    Job,
    Options,
    batches,
    check_a1111_clip_skip,
    check_options,
    check_precision,
    hires_on,
    parse_lora,
    pick_seed,
    plan,
    resolve_precision,
    seed_of,
    steps_run,
)

_CORE = (
    "DTYPES",
    "available_memory",
    "final_size",
    "generate",
    "load",
    "memory_estimate",
    "pipeline_for",
    "prepare",
    "render",
    "size_of",
    "task_of",
    "task_pipeline",
    "validate",
)
__all__ = [
    "ATTENTION",
    "MAX_SEED",
    "PRECISIONS",
    "Job",
    "Options",
    "batches",
    "check_a1111_clip_skip",
    "check_options",
    "check_precision",
    "hires_on",
    "parse_lora",
    "pick_seed",
    "plan",
    "resolve_precision",
    "seed_of",
    "steps_run",
    *_CORE,
]


def __getattr__(name: str):
    if name in _CORE:
        return getattr(importlib.import_module("gen.generation.core"), name)
    raise AttributeError(f"module 'gen.generation' has no attribute {name!r}")
