"""The generation core every front-end calls: options in, images and their metadata out.

options.py    what decides the pictures, checked before anything loads (torch-free)
inputs.py     init images and masks for image-to-image and inpainting: read, checked, hashed (torch-free)
core.py       load and prepare a pipeline, render batches of jobs, gen.generate
clip_skip.py  A1111's Clip skip number and which encoders it applies to, as the pipelines take it
attention.py  the pipeline-wide attention switch
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
    parse_lora,
    pick_seed,
    plan,
    seed_of,
    steps_run,
)

_CORE = (
    "DTYPES",
    "available_memory",
    "generate",
    "load",
    "memory_estimate",
    "prepare",
    "render",
    "size_of",
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
    "parse_lora",
    "pick_seed",
    "plan",
    "seed_of",
    "steps_run",
    *_CORE,
]


def __getattr__(name: str):
    if name in _CORE:
        return getattr(importlib.import_module("gen.generation.core"), name)
    raise AttributeError(f"module 'gen.generation' has no attribute {name!r}")
