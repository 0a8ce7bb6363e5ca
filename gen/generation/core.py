"""Generation as every front-end does it (the CLI, `gen.generate`, the server): options in, images out, one
generator per image, batched, reproducible.

Image k of a run with seed S gets its own generator seeded S + k, so it is the same image whatever the batch
size, its batch-mates or the number of processes: the DiT and per-image VAE decoding are batch-invariant (see
gen.models.dit), prompts are denoised with their own chunk count (see the pipeline's _denoise), and where the
CPU's matrix kernels depend on the batch shape or thread count the image stays within
gen.generation.metadata.PIXEL_TOLERANCE.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from weakref import WeakKeyDictionary

import torch

from gen.diffusion.samplers import make_scheduler
from gen.generation.clip_skip import not_applied, pipeline_clip_skip
from gen.generation.control_units import check_units
from gen.generation.controlnets import nets, steered
from gen.generation.families import call_arguments, check_family, is_flow, task_class
from gen.generation.families import not_applied as distilled_not_applied
from gen.generation.hires import hires_size, render_hires
from gen.generation.inputs import (
    ControlPictures,
    InitImages,
    paste_back,
    read_control_pictures,
    read_init_images,
)
from gen.generation.options import (
    Job,
    Options,
    batches,
    check_options,
    hires_on,
    parse_lora,
    pick_seed,
    plan,
    resolve_precision,
)
from gen.loading.pipeline import load_pipeline, model_folder, pipeline_class
from gen.loading.precision import native_bf16
from gen.pipelines import TextToImagePipeline
from gen.pipelines.attention_backend import set_attention
from gen.pipelines.checks import check_clip_skip, check_size
from gen.pipelines.flow_single_file import flow_family

logger = logging.getLogger(__name__)

# A loaded pipeline -> the scheduler its model came with: other samplers are made from its config, not from a
# swapped-in sampler's (which would pass on its options: Karras sigmas, solver type).
_OWN_SCHEDULER: WeakKeyDictionary = WeakKeyDictionary()
# A loaded pipeline -> {(task, sampler): a pipeline sharing its weights}, made once, not per batch.
_TASKS: WeakKeyDictionary = WeakKeyDictionary()

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def prepare(pipe, o: Options):
    """Set the sampler, attention backend, compilation and the batch-invariant VAE decode on a loaded pipeline."""
    _OWN_SCHEDULER.setdefault(pipe, pipe.scheduler)
    if o.sampler is not None:
        pipe.scheduler = make_scheduler(o.sampler, pipe.scheduler.config)
    set_attention(pipe, o.attention)
    if o.lora:
        names, weights = [], []
        for k, spec in enumerate(o.lora):
            path, weight = parse_lora(spec)
            names.append(pipe.load_lora_weights(path, adapter_name=f"lora{k}", allow_pickle=o.allow_pickle))
            weights.append(weight)
        pipe.set_adapters(names, weights)
    if o.compile:
        pipe.denoiser.compile()  # in place: the module keeps its type; the compiled graph is reused across calls
    channels_last(pipe)
    if o.dtype == "bf16" and not native_bf16(pipe.denoiser.device)[0]:  # OpenVINO's hint too: the same CPU
        logger.warning(
            "this %s has no native bf16 (AVX-512 BF16 or AMX): bf16 runs many times slower than fp32 here",
            pipe.denoiser.device.type,
        )
    pipe.vae.enable_slicing()  # one image per decode: convolutions are not batch-invariant
    return pipe


def channels_last(pipe) -> bool:
    """A UNet pipeline on a CPU, fp32 or bf16: UNet and VAE weights in channels_last, so oneDNN's convolutions work
    in their native layout instead of converting at every call. Measured at SD 1.5 scale (`gen bench --arch sd15`,
    outputs within 1e-4 in fp32): UNet step and VAE decode ~10-15 % faster in fp32 on an AVX2 CPU; on an Intel AMX
    CPU, one thread, the bf16 UNet step 1.31 -> 1.12 s and the fp32 VAE decode (gen's, beside a bf16 UNet) 7.0 ->
    4.5 s. Not the DiT (one convolution, its patch embedding), and bf16 only where the CPU has native bf16 (the
    only place it was measured; elsewhere bf16 is many times slower anyway and warned about)."""
    unet = getattr(pipe, "unet", None)
    if unet is None or unet.device.type != "cpu" or unet.dtype not in (torch.float32, torch.bfloat16):
        return False
    if unet.dtype == torch.bfloat16 and not native_bf16(unet.device)[0]:
        return False
    unet.to(memory_format=torch.channels_last)
    if pipe.vae.dtype in (torch.float32, torch.bfloat16):
        pipe.vae.to(memory_format=torch.channels_last)
    return True


def task_pipeline(pipe, init: InitImages | None, scheduler=None):
    """The pipeline for the task, sharing `pipe`'s loaded weights: text-to-image, image-to-image (an init image)
    or inpainting (an init image and a mask); with `scheduler` instead of `pipe`'s if given."""
    cls = type(pipe) if init is None else task_class(pipe, task_of(init))
    if type(pipe) is cls and scheduler is None:
        return pipe
    return _from(pipe, cls, scheduler)


def _from(pipe, cls, scheduler=None):
    """`cls` sharing `pipe`'s components (with `scheduler` instead of its own if given)."""
    task = cls.from_pipe(pipe, **({} if scheduler is None else {"scheduler": scheduler}))
    task.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))  # from_pipe does not copy it
    return task


def pipeline_for(pipe, task: str, sampler: str | None):
    """`pipe`'s pipeline for a task ("text", "image" for image-to-image, "inpaint") and sampler (None: the
    scheduler `pipe` has), sharing its weights; made once per (task, sampler) and kept while `pipe` lives."""
    made = _TASKS.setdefault(pipe, {})
    if (task, sampler) not in made:
        cls = task_class(pipe, task)
        own = _OWN_SCHEDULER.get(pipe, pipe.scheduler)
        scheduler = make_scheduler(sampler, own.config) if sampler else None
        if type(pipe) is cls and scheduler is None:
            made[(task, sampler)] = pipe
        else:
            made[(task, sampler)] = (
                task_pipeline(pipe, None, scheduler) if task == "text" else _from(pipe, cls, scheduler)
            )
        _OWN_SCHEDULER.setdefault(made[(task, sampler)], own)
    return made[(task, sampler)]


def task_of(init: InitImages | None) -> str:
    return "text" if init is None else "image" if init.mask is None else "inpaint"


def render(
    pipe,
    o: Options,
    batch: list[Job],
    on_step: Callable[[], None] | None = None,
    init: InitImages | None = None,
    control: ControlPictures | None = None,
) -> list:
    """PIL images for one batch of jobs, one generator per image; from `init` (image-to-image, inpainting)
    when given, the original pasted back outside an inpainting mask; steered by the ControlNet units of
    `o.control`, whose pictures `control` holds."""
    callback = _step_callback(on_step) if on_step else None
    height, width = size_of(pipe, o, init)
    kwargs = {
        "num_inference_steps": o.steps,
        "width": width if init is None else o.width,
        "height": height if init is None else o.height,
        "generator": [torch.Generator().manual_seed(j.seed) for j in batch],
        "callback_on_step_end": callback,
        **call_arguments(pipe, o, len(batch)),
    }
    if not is_flow(pipe):
        kwargs["clip_skip"] = pipeline_clip_skip(pipe, o.clip_skip, o.sdxl_clip_l_skip)
    prompts = [j.prompt for j in batch]
    if init is None and hires_on(o):
        return _render_hires(pipe, o, prompts, kwargs, control, height, width)
    task = pipeline_for(pipe, task_of(init), None)  # made once, not per batch (its ControlNet variant too)
    if control is not None:
        task, extra = steered(task, o, task_of(init), control, width, height)
        kwargs.update(extra)
    if init is None:
        return task(prompts, **kwargs).images
    kwargs.update(image=init.image, strength=o.strength)
    if init.mask is None:
        return task(prompts, **kwargs).images
    images = task(prompts, mask_image=init.mask, **kwargs).images
    return [paste_back(init, image) for image in images]


def _render_hires(pipe, o: Options, prompts, kwargs: dict, control, height: int, width: int) -> list:
    """Hires fix's two passes, each steered by the ControlNet units its hr_option names."""
    first, second = task_pipeline(pipe, None), pipeline_for(pipe, "image", o.hires_sampler or o.sampler)
    if control is None:
        return render_hires(first, second, o, prompts, kwargs)
    first, first_extra = steered(first, o, "text", control, width, height, hires_pass=False)
    big_h, big_w = hires_size(pipe, o, height, width)
    second, second_extra = steered(second, o, "image", control, big_w, big_h, hires_pass=True)
    return render_hires(first, second, o, prompts, kwargs, first_extra, second_extra)


def _step_callback(on_step: Callable[[], object]) -> Callable:
    """diffusers' callback_on_step_end around a plain per-step hook. The hook's return value is dropped: a
    progress bar's update (tqdm returns True when it redraws, as in a terminal) is not the pipeline's business."""

    def callback(pipe, i: int, t, tensors: dict) -> dict:
        on_step()
        return {}

    return callback


def size_of(pipe, o: Options, init: InitImages | None = None) -> tuple[int, int]:
    """(height, width) of the images: as given, else the init image's (rounded down to the model's stride), else
    the model's own."""
    if init is not None:
        return pipe._size_of(init.image, o.height, o.width)
    return (
        pipe.default_size if o.height is None else o.height,
        pipe.default_size if o.width is None else o.width,
    )


def final_size(pipe, o: Options, init: InitImages | None = None) -> tuple[int, int]:
    """(height, width) of the images made: size_of's, or hires fix's upscaled size."""
    height, width = size_of(pipe, o, init)
    if init is None and hires_on(o):
        return hires_size(pipe, o, height, width)
    return height, width


def validate(pipe, o: Options, init: InitImages | None = None) -> None:
    """The request (already checked on its own by check_options) against the loaded pipeline, once per request
    and before any image work: its size against the model's stride, its Clip skip against the model's encoders,
    and a memory estimate. The pipeline's call keeps its own checks, for Python callers."""
    check_family(pipe, o, init)
    check_size(pipe, *size_of(pipe, o, init))
    height, width = final_size(pipe, o, init)
    check_size(pipe, height, width)
    check_clip_skip(pipe, pipeline_clip_skip(pipe, o.clip_skip, o.sdxl_clip_l_skip))
    if o.control:  # the nets load here, once: a net of another base is named before any image work
        nets(pipe, check_units(o.control), o.allow_pickle)
    for note in (not_applied(pipe, o.clip_skip, o.sdxl_clip_l_skip), distilled_not_applied(pipe, o)):
        if note:
            logger.warning(note)
    need = memory_estimate(pipe, o.batch_size, height, width)
    free = available_memory()
    if free and need > free:
        raise ValueError(
            f"{width}x{height} at batch size {o.batch_size} needs about {need / 2**30:.1f} GiB, more than the"
            f" {free / 2**30:.1f} GiB available; use a smaller size or --batch-size, or VAE tiling / CPU offload"
        )


def memory_estimate(pipe, batch: int, height: int, width: int) -> int:
    """A rough upper bound on activation bytes: the denoiser's tokens x channels x a depth factor and its attention
    matrices (CFG doubles the batch), plus the VAE decoder's widest feature map for one image (decoded singly)."""
    d = pipe.denoiser.config
    itemsize = torch.tensor([], dtype=pipe.denoiser.dtype).element_size()
    tokens = (height // pipe.latent_stride) * (width // pipe.latent_stride)
    if getattr(d, "num_attention_heads", None):  # DiT
        heads, channels = d.num_attention_heads, d.num_attention_heads * d.attention_head_dim
    else:  # UNet: attention at the full latent resolution, widest block for the channels
        heads, channels = 8, max(d.block_out_channels)
    attention = 2 * batch * heads * tokens * tokens * itemsize
    activations = 2 * batch * tokens * channels * itemsize * 16
    vae = height * width * max(pipe.vae.config.block_out_channels) * 4 * 6
    return attention + activations + vae


def available_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def available_devices() -> list[str]:
    """The devices torch can run on here: cpu, each CUDA GPU, mps and xpu where present."""
    devices = ["cpu"] + [f"cuda:{k}" for k in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        devices += [f"xpu:{k}" for k in range(torch.xpu.device_count())]
    return devices


def check_device(device: str) -> None:
    """A device this machine has (torch's own errors for "tpu" or a CPU-only build are tracebacks)."""
    allowed = available_devices()
    name = str(device)
    try:
        parsed = torch.device(name)
    except (RuntimeError, ValueError):
        parsed = None
    if parsed is not None:
        index = parsed.index if parsed.index is not None else 0
        full = parsed.type if parsed.type in ("cpu", "mps") else f"{parsed.type}:{index}"
        if full in allowed:
            return
    raise ValueError(f"device {name!r} is not available on this machine; allowed: {', '.join(allowed)}")


def check_backend_family(model: str | None, backend: str) -> None:
    """OpenVINO runs gen's DiT and SD's UNet; an SD3/Flux folder is refused in one line before any loading."""
    if backend == "torch":
        return
    folder = model_folder(model)
    flow = flow_family(folder) is not None if folder.is_file() else False
    if folder.is_dir():
        flow = pipeline_class(folder).__name__ != TextToImagePipeline.__name__
    if flow:
        raise ValueError(
            f"backend {backend!r} does not run SD3/Flux models ({folder}) yet; use --backend torch"
        )


def load(o: Options):
    """The pipeline `o` asks for, prepared; o.dtype "auto" resolved first (resolve_precision), in place."""
    check_device(o.device)
    check_backend_family(o.model, o.backend)
    why = resolve_precision(o)
    if why:
        logger.info("precision: %s (%s)", o.dtype, why)
    pipe = load_pipeline(
        o.model,
        torch_dtype=DTYPES[o.dtype],
        device=o.device,
        allow_pickle=o.allow_pickle,
        backend=o.backend,
        base=o.base,
        text_encoders=o.text_encoder,
        vae=o.vae,
    )
    return prepare(pipe, o)


def generate(prompt: str | list[str], **options) -> list:
    """Generate images from Python with the CLI's options (same names, same code path): list of PIL images.

    >>> images = gen.generate("a red circle on a blue background", num_images=2, seed=7)
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    o = Options(prompt=prompts[0] if prompts else "", **options)
    check_options(o)
    if o.seed is None:
        o.seed = pick_seed()
    init = read_init_images(o.init_image, o.mask, o.mask_blur, o.invert_mask)
    control = read_control_pictures(o.control)
    pipe = load(o)
    validate(pipe, o, init)
    return [
        image
        for batch in batches(plan(prompts, o.num_images, o.seed), o.batch_size)
        for image in render(pipe, o, batch, init=init, control=control)
    ]
