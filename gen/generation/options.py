"""Generation options and the job plan: what decides the pictures, checked before anything loads.

Torch-free, so the CLI can offer and check these values without importing torch. One place for each rule the
front-ends share: the allowed precisions (and what "auto" becomes) and attention backends, fp16 refused on a CPU,
and image k of a run with seed S getting seed S + k.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

from gen.diffusion.samplers import SAMPLERS, unknown_sampler
from gen.generation.control_units import NO_INPAINT, check_units, parse_control
from gen.generation.fields import check_value, option, specs
from gen.generation.upscale import UPSCALERS
from gen.loading.precision import BACKENDS, PRECISIONS, check_backend, check_precision, pick_precision
from gen.pipelines.attention_backend import ATTENTION
from gen.pipelines.checks import check_strength

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes up to 64 bits


def parse_interval(text: str) -> tuple[float, float]:
    """START,END as the command line writes a guidance interval (0,0.6)."""
    try:
        start, end = (float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{text!r} is not START,END (e.g. 0,0.6)") from None
    if not 0 <= start < end <= 1:
        raise ValueError(f"{text!r}: need 0 <= START < END <= 1")
    return start, end


@dataclass
class Options:
    """THE request: everything that decides the pictures, each field's default, bounds and help written once.

    The CLI's flags are made from these fields (gen.cli.flags), each HTTP API maps its published names onto them
    in one table (gen.serve), and every PNG records them (gen.generation.metadata); `gen reproduce` reads them
    back with `from_dict`. None means "the model's own" (size, sampler) where a field allows it.
    """

    prompt: str = option("", "what to draw (or --from-file)", cli=False)
    negative: str = option("", "negative prompt (default: none)")
    model: str | None = option(
        None, "local pipeline folder or single file, ours or a Stable Diffusion one (default: embedded)"
    )
    base: str | None = option(
        None,
        "with a single-file --model: the diffusers folder of the same model its other parts come from (default:"
        " gen's shipped configs and tokenizers)",
        metavar="DIR",
    )
    # ComfyUI's clip_l / clip_g / t5xxl and Black Forest Labs' ae.safetensors beside an SD3/Flux file
    text_encoder: list[str] = option(
        [],
        "with an SD3/Flux transformer file: a text encoder's file or transformers folder (CLIP-L, CLIP-G or T5,"
        " told apart by their weights; repeatable); wins over one the file or --base carries",
        metavar="PATH",
    )
    vae: str | None = option(
        None,
        "with an SD3/Flux transformer file: the VAE's file (original layout, e.g. Flux's ae.safetensors) or"
        " diffusers folder; wins over one the file or --base carries",
        metavar="PATH",
    )
    num_images: int = option(1, "images per prompt", flags=("-n", "--num-images"), ge=1)
    batch_size: int = option(1, "images computed together; never changes them", ge=1)
    seed: int | None = option(
        None, "seed of the first image; image k gets seed+k (default: random, printed)", ge=0, le=MAX_SEED
    )
    steps: int = option(20, "sampling steps", ge=1, le=10_000, hint="; a few dozen is typical")
    sampler: str | None = option(None, "sampler name, see `gen samplers` (default: the model's own)")
    guidance: float | None = option(
        None,
        "classifier-free guidance scale; <= 1 turns CFG off (default: the model's own: 5, SD3 7, Flux 1 = off)",
        flags=("--guidance", "--cfg"),
        finite=True,
        ge=0.0,
    )
    # Flux-dev's guidance embedding, apart from CFG as Forge has it ("Distilled CFG Scale")
    distilled_guidance: float | None = option(
        None,
        "Flux: the distilled guidance the transformer is given (default: 3.5; not applied to other models)",
        finite=True,
        ge=0.0,
    )
    guidance_rescale: float = option(
        0.0, "rescale CFG towards the text branch's std, 0..1", finite=True, ge=0.0, le=1.0
    )
    width: int | None = option(None, "image width in pixels (default: the model's)")
    height: int | None = option(None, "image height in pixels (default: the model's)")
    device: str = option("cpu", "cpu, cuda, cuda:1, ...")
    dtype: str = option(
        "auto",
        "precision; auto: bf16 where the device has native bf16 (AMX or AVX-512 BF16, CUDA Ampere+), else fp32",
        choices=PRECISIONS,
    )
    backend: str = option(
        "torch",
        "what runs the denoiser and VAE: torch, or openvino (pip install 'gen[openvino]'; CPU; converted once and"
        " cached, each new size compiled once)",
        choices=BACKENDS,
    )
    # A1111's numbering: 1 the last layer, 2 the penultimate (gen.generation.clip_skip)
    clip_skip: int | None = option(
        None,
        "A1111's Clip skip: read the text encoder's Nth layer from the end (1 the last, 2 the penultimate); as in"
        " A1111, not applied to SD 2.x, nor to SDXL without --sdxl-clip-l-skip",
        metavar="N",
    )
    sdxl_clip_l_skip: bool = option(
        False, "SDXL: apply --clip-skip to the first text encoder (CLIP-L), A1111's 'Clip skip SDXL' setting"
    )
    attention: str = option("sdpa", "attention kernels", choices=ATTENTION)
    compile: bool = option(False, "torch.compile the denoiser (slow first call, faster after)")
    guidance_interval: tuple[float, float] | None = option(
        None, "START,END: CFG only in this part of the schedule, 0..1", parse=parse_interval
    )
    allow_pickle: bool = option(
        False, "also load .bin/.ckpt weights (pickle can run code; read weights-only)"
    )
    lora: list[str] = option(
        [],
        "apply a LoRA file or folder, diffusers' or kohya's format (repeatable; weight 1 by default)",
        metavar="PATH[:WEIGHT]",
    )
    # image-to-image (and, with a mask, inpainting) starts from this picture
    init_image: str | None = option(
        None, "image-to-image: start from this picture (its size unless --width/--height)", metavar="PNG"
    )
    mask: str | None = option(
        None, "inpaint: repaint where this mask is white (needs --init-image)", metavar="PNG"
    )
    # how much of the schedule re-draws the init image (A1111's denoising strength)
    strength: float = option(
        0.75, "how much of the init image is re-drawn, 0..1", ge=0.0, le=1.0, finite=True
    )
    mask_blur: int = option(4, "blur the mask's edge by this many pixels", ge=0)  # A1111's default
    invert_mask: bool = option(False, "repaint where the mask is black instead")
    # Hires fix (A1111's): render at width x height, upscale, then re-draw at the larger size with image-to-image;
    # on when a hires scale or size is given.
    hires_scale: float | None = option(
        None,
        "hires fix: upscale by this factor, then refine with image-to-image",
        ge=1.0,
        le=16.0,
        finite=True,
    )
    hires_width: int | None = option(None, "hires fix: upscale to this width (alone: aspect kept)", ge=1)
    hires_height: int | None = option(None, "hires fix: upscale to this height (alone: aspect kept)", ge=1)
    hires_upscaler: str = option(
        "Latent", "hires fix: how to upscale (latent modes resize the latents)", choices=UPSCALERS
    )
    hires_steps: int = option(0, "hires fix: steps of the second pass (0: --steps)", ge=0, le=10_000)
    hires_strength: float = option(
        0.75, "hires fix: how much the second pass re-draws, 0..1", ge=0.0, le=1.0, finite=True
    )
    hires_sampler: str | None = option(None, "hires fix: the second pass's sampler (default: --sampler's)")
    hires_prompt: str = option("", "hires fix: the second pass's prompt (default: the prompt)")
    hires_negative: str = option("", "hires fix: the second pass's negative prompt (default: --negative)")
    # ControlNet units (gen.generation.control_units), in A1111's sd-webui-controlnet terms
    control: list[dict] = option(
        [],
        "ControlNet unit (repeatable): model=NET,image=PNG[,module=canny,weight=1,start=0,end=1,"
        "mode=balanced|prompt|control,resize=crop|just|fill,res=512,a=..,b=..,pixel_perfect=1,hr=both|low|high]",
        metavar="UNIT",
        parse=parse_control,
    )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Options:
        """Options from to_dict()'s JSON (a PNG record, a stored job): fields this gen does not know are left
        out, missing ones take their defaults, JSON's lists become the tuples the fields hold."""
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        if isinstance(known.get("guidance_interval"), list):
            known["guidance_interval"] = tuple(known["guidance_interval"])
        return cls(**known)


@dataclass(frozen=True)
class Job:
    index: int  # position in the run: the k of seed S + k
    prompt: str
    seed: int


def check_options(o: Options) -> None:
    """Refuse bad values before loading anything: ValueError naming the value and what is allowed. Each field's
    bounds and choices come from its Spec; the rules between fields follow. (The pipelines keep their own checks
    for Python callers; the core does not re-run them, see gen.generation.core.validate.)"""
    for name, (_, spec, kind) in specs(Options).items():
        check_value(name, getattr(o, name), spec, kind)
    for sampler in (o.sampler, o.hires_sampler):
        if sampler is not None:
            if sampler not in SAMPLERS:
                raise unknown_sampler(sampler)
    for name, what in (
        ("prompt", "prompt"),
        ("negative", "negative prompt"),
        ("hires_prompt", "hires prompt"),
    ):
        check_text(getattr(o, name), what)
    check_text(o.hires_negative, "hires negative prompt")
    check_precision(o.dtype, o.device)
    check_backend(o.backend, o.dtype, o.device)
    if o.backend == "openvino" and (o.lora or o.compile):
        what = "LoRA" if o.lora else "--compile"
        raise ValueError(f"backend 'openvino' runs the weights as converted: {what} is not supported there yet;"
                         " use --backend torch")  # fmt: skip
    check_a1111_clip_skip(o.clip_skip, o.sdxl_clip_l_skip)
    if o.guidance_interval is not None:
        parse_interval(",".join(str(x) for x in o.guidance_interval))
    check_init(o)
    check_hires(o)
    if check_units(o.control) and o.mask is not None:
        raise ValueError(NO_INPAINT)


def resolve_precision(o: Options) -> str | None:
    """o.dtype "auto" made the precision it picks on o.device (gen.loading.precision.pick_precision), before the
    pipeline loads: the PNG then records, and `gen reproduce` re-runs, what ran. Returns why auto chose it (None
    for a precision given by name, or already resolved)."""
    o.dtype, why = pick_precision(o.dtype, o.device, o.backend)
    return why


def hires_on(o: Options) -> bool:
    """Is hires fix on: a scale or a size given."""
    return o.hires_scale is not None or o.hires_width is not None or o.hires_height is not None


def check_hires(o: Options) -> None:
    """Hires fix renders from text: not with an init image (image-to-image already takes a size); its second
    pass must run at least one step."""
    if not hires_on(o):
        return
    if o.init_image is not None:
        raise ValueError("hires fix is for text-to-image; with an init image, give --width/--height instead")
    try:
        check_strength(o.hires_strength, o.hires_steps or o.steps)
    except ValueError as e:
        raise ValueError(f"hires fix: {e}") from None


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
    """Image-to-image and inpainting options: a mask only with an init image, and the pipelines' strength rule
    (gen.pipelines.checks: at least one step runs)."""
    if o.init_image is None:
        if o.mask is not None:
            raise ValueError(
                "a mask needs an init image, the picture to inpaint (--init-image; init_image over HTTP)"
            )
        return
    check_strength(o.strength, o.steps)


def steps_run(o: Options) -> int:
    """Denoising steps one image takes: the last int(steps x strength) of the schedule for an init image; with
    hires fix, the second pass's int(hires steps x hires strength) after the first pass's."""
    first = o.steps if o.init_image is None else int(o.steps * o.strength)
    return first + (int((o.hires_steps or o.steps) * o.hires_strength) if hires_on(o) else 0)


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
