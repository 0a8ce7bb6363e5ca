"""Generation options and the job plan: what decides the pictures, checked before anything loads.

Torch-free, so the CLI can offer and check these values without importing torch. One place for each rule the
front-ends share: the allowed precisions and attention backends, fp16 refused on a CPU, and image k of a run
with seed S getting seed S + k.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

PRECISIONS = ("fp32", "bf16", "fp16")
ATTENTION = ("sdpa", "math", "xformers")  # SDPA (default), plain matmuls, xformers where it can run

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes up to 64 bits


@dataclass
class Options:
    """Everything that decides the pictures (and is written into each PNG's metadata)."""

    prompt: str = ""
    negative: str = ""
    model: str | None = None
    num_images: int = 1
    batch_size: int = 1
    seed: int | None = None
    steps: int = 20
    sampler: str | None = None  # None: the model's own scheduler
    guidance: float = 5.0
    guidance_rescale: float = 0.0
    width: int | None = None
    height: int | None = None
    device: str = "cpu"
    dtype: str = "fp32"
    clip_skip: int | None = None  # A1111's: 1 the last layer, 2 the penultimate (gen.generation.clip_skip)
    sdxl_clip_l_skip: bool = False  # A1111's "Clip skip SDXL": apply clip_skip to SDXL's first encoder
    attention: str = "sdpa"
    compile: bool = False
    guidance_interval: tuple[float, float] | None = None
    allow_pickle: bool = False
    lora: list[str] = field(default_factory=list)  # PATH or PATH:WEIGHT, PATH a LoRA file or folder
    init_image: str | None = None  # image-to-image (and, with a mask, inpainting) starts from this picture
    mask: str | None = None  # white = repaint
    strength: float = 0.75  # how much of the schedule re-draws the init image (A1111's denoising strength)
    mask_blur: int = 4  # pixels, A1111's default
    invert_mask: bool = False
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Job:
    index: int  # position in the run: the k of seed S + k
    prompt: str
    seed: int


def check_options(o: Options) -> None:
    """Refuse bad values before loading anything: ValueError naming the value and what is allowed."""
    for name in ("num_images", "batch_size", "steps"):
        value = getattr(o, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name.replace('_', '-')} {value!r} must be an integer >= 1")
    if o.steps > 10_000:
        raise ValueError(f"steps {o.steps} is more than 10000; a few dozen is typical")
    if o.sampler is not None:
        from gen.diffusion.samplers import SAMPLERS, unknown_sampler

        if o.sampler not in SAMPLERS:
            raise unknown_sampler(o.sampler)
    if o.seed is not None and not 0 <= o.seed <= MAX_SEED:
        raise ValueError(f"seed {o.seed} must be between 0 and 2**64-1")
    for name in ("prompt", "negative"):
        check_text(getattr(o, name), name.replace("negative", "negative prompt"))
    check_precision(o.dtype, o.device)
    check_a1111_clip_skip(o.clip_skip, o.sdxl_clip_l_skip)
    if o.attention not in ATTENTION:
        raise ValueError(f"attention {o.attention!r} must be one of {list(ATTENTION)}")
    for name in ("guidance", "guidance_rescale"):
        value = getattr(o, name)
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{name.replace('_', '-')} {value!r} must be a finite number")
    check_init(o)


def check_text(text: str, name: str = "prompt") -> None:
    """Text the tokenizer can take: a str that is valid Unicode. A lone surrogate (JSON's "\\ud83d" without its
    pair, or undecodable bytes in argv) passes JSON parsing and argparse but fails in the tokenizer, in the middle
    of a batch that other requests share, and cannot be written into a PNG's metadata."""
    if not isinstance(text, str):
        raise ValueError(f"{name} {text!r} must be text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start : e.end].encode("utf-8", "backslashreplace").decode("ascii")
        raise ValueError(
            f"{name} has an invalid character {bad} at position {e.start} (a lone UTF-16 surrogate); send valid"
            " Unicode text"
        ) from None


def check_a1111_clip_skip(clip_skip: int | None, sdxl_clip_l_skip: bool = False) -> None:
    """A1111's Clip skip: a whole number from 1 (the last layer); its upper bound is the model's layer count
    (gen.generation.clip_skip). Not the pipelines' clip_skip (gen.pipelines.checks), which counts layers skipped."""
    whole = isinstance(clip_skip, int) and not isinstance(clip_skip, bool)
    if clip_skip is not None and (not whole or clip_skip < 1):
        raise ValueError(
            f"clip skip {clip_skip!r} must be an integer >= 1 (A1111's numbering: 1 is the text encoder's last"
            " layer, 2 the penultimate)"
        )
    if not isinstance(sdxl_clip_l_skip, bool):
        raise ValueError(f"sdxl-clip-l-skip {sdxl_clip_l_skip!r} must be true or false")


def check_init(o: Options) -> None:
    """Image-to-image and inpainting options: the pipelines' strength rule (gen.pipelines.checks), a mask only
    with an init image, a blur of whole pixels."""
    if o.init_image is None:
        if o.mask is not None:
            raise ValueError("--mask needs --init-image (the picture to inpaint)")
        return
    from gen.pipelines.checks import check_strength

    check_strength(o.strength, o.steps)
    if not isinstance(o.mask_blur, int) or o.mask_blur < 0:
        raise ValueError(f"mask-blur {o.mask_blur!r} must be an integer >= 0 (pixels)")


def steps_run(o: Options) -> int:
    """Denoising steps one image takes: the last int(steps x strength) of the schedule for an init image."""
    return o.steps if o.init_image is None else int(o.steps * o.strength)


def check_precision(dtype: str, device: str) -> None:
    """A known precision, and not fp16 on a CPU (emulated there: ~10x slower than fp32)."""
    if dtype not in PRECISIONS:
        raise ValueError(f"dtype {dtype!r} must be one of {list(PRECISIONS)}")
    if dtype == "fp16" and str(device).split(":")[0] == "cpu":
        raise ValueError("dtype fp16 is ~10x slower than fp32 on a CPU; use bf16 or fp32 there")


def seed_of(seed: int, k: int) -> int:
    """Image k of a run with seed S: seed S + k, wrapping past 2**64 (the CLI, the server and gen eval)."""
    return (seed + k) % (MAX_SEED + 1)


def parse_lora(spec: str) -> tuple[str, float]:
    """PATH or PATH:WEIGHT (the weight after the last colon, if it is a number). PATH is a LoRA file (diffusers' or
    kohya's format) or a folder holding pytorch_lora_weights.safetensors."""
    path, _, weight = spec.rpartition(":")
    if path:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return spec, 1.0


def pick_seed() -> int:
    return secrets.randbelow(2**32)


def plan(prompts: Iterable[str], num_images: int, seed: int) -> Iterator[Job]:
    """Jobs in order: every prompt `num_images` times, image k getting seed + k (wrapping past 2**64)."""
    k = 0
    for prompt in prompts:
        for _ in range(num_images):
            yield Job(k, prompt, seed_of(seed, k))
            k += 1


def batches(jobs: Iterable[Job], size: int) -> Iterator[list[Job]]:
    batch: list[Job] = []
    for job in jobs:
        batch.append(job)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
