"""ControlNet units at render time: their nets loaded once per pipeline, the pipelines that run them (sharing the
loaded pipeline's weights), the control images made for each pass's size, and the call arguments.

A unit's picture goes through its preprocessor at the processor resolution (or Pixel Perfect's), then is fitted to
the pass's size by its resize mode, as sd-webui-controlnet does (gen.control). With hires fix a unit steers the
passes its hr_option names; in the second pass canny units weigh the prompt more (A1111 forces its soft injection
there for canny), and A1111 treats every unit as "Both" without hires fix.
"""

from __future__ import annotations

from weakref import WeakKeyDictionary

from gen.control import detect, fit, pixel_perfect
from gen.generation.control_units import CONTROL_MODES, NO_INPAINT, ControlUnit, check_units
from gen.generation.inputs import ControlPictures
from gen.loading.controlnet import load_controlnet
from gen.pipelines import ControlNetImageToImagePipeline, ControlNetPipeline
from gen.pipelines.checks import check_base

# A UNet -> {ControlNet path: its net} (every pipeline made from one loaded model shares its UNet, so a net loads
# once for all of them); a pipeline -> {(task, paths): its ControlNet pipeline}
_NETS: WeakKeyDictionary = WeakKeyDictionary()
_PIPELINES: WeakKeyDictionary = WeakKeyDictionary()
SOFT_IN_HIRES = ("canny",)  # A1111: mlsd too, a preprocessor gen does not draw


def steers(unit: ControlUnit, hires_pass: bool | None) -> bool:
    """Does the unit steer this pass: None without hires fix (every unit), False its first pass, True its
    second."""
    if hires_pass is None:
        return True
    return unit.hr_option != ("Low res only" if hires_pass else "High res only")


def nets(pipe, units: list[ControlUnit], allow_pickle: bool = False) -> list:
    """The units' ControlNets in the pipeline's precision and device, each loaded once while `pipe` lives, and
    each checked against its base (an SD 1.5 net on SDXL names both)."""
    if getattr(pipe, "denoiser_name", None) != "unet":
        raise ValueError(
            "ControlNet steers UNet models (SD 1.x, 2.x, SDXL); this model's denoiser is gen's DiT"
        )
    loaded = _NETS.setdefault(pipe.unet, {})
    for k, unit in enumerate(units):
        if unit.model not in loaded:
            net = load_controlnet(unit.model, torch_dtype=pipe.unet.dtype, allow_pickle=allow_pickle)
            check_base(pipe.unet, net, k)
            loaded[unit.model] = net.to(pipe.unet.device)
    return [loaded[u.model] for u in units]


def control_pipeline(pipe, task: str, units: list[ControlUnit], allow_pickle: bool = False):
    """`pipe`'s task ("text" or "image": image-to-image and hires fix's second pass) steered by the units'
    nets, sharing `pipe`'s weights and scheduler; made once per (task, nets)."""
    if task not in ("text", "image"):
        raise ValueError(NO_INPAINT)
    made = _PIPELINES.setdefault(pipe, {})
    key = (task, tuple(u.model for u in units))
    if key not in made:
        loaded = nets(pipe, units, allow_pickle)
        cls = ControlNetPipeline if task == "text" else ControlNetImageToImagePipeline
        made[key] = cls.from_pipe(pipe, controlnet=loaded[0] if len(loaded) == 1 else loaded)
        made[key].set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return made[key]


def control_image(unit: ControlUnit, pictures: ControlPictures, k: int, width: int, height: int):
    """Unit k's control image at width x height, made once per size and kept with the pictures."""
    key = (k, width, height)
    if key not in pictures.made:
        picture = pictures.pictures[k]
        res = unit.processor_res
        if unit.pixel_perfect:
            res = pixel_perfect(width, height, picture.width, picture.height, unit.resize_mode)
        made = detect(picture, unit.module, unit.threshold_a, unit.threshold_b, max(64, res))
        pictures.made[key] = fit(made, width, height, unit.resize_mode)
    return pictures.made[key]


def control_arguments(units: list[ControlUnit], images: list, task: str, hires_pass: bool = False) -> dict:
    """The ControlNet pipelines' call arguments for these units and their control images."""
    modes = [
        "prompt" if hires_pass and u.module in SOFT_IN_HIRES and u.control_mode == "Balanced"
        else CONTROL_MODES[u.control_mode]
        for u in units
    ]  # fmt: skip
    return {
        "image" if task == "text" else "control_image": images[0] if len(images) == 1 else images,
        "controlnet_conditioning_scale": [u.weight for u in units],
        "control_guidance_start": [u.guidance_start for u in units],
        "control_guidance_end": [u.guidance_end for u in units],
        "control_mode": modes,
    }


def steered(pipe, o, task: str, pictures: ControlPictures, width: int, height: int, hires_pass=None):
    """(the pipeline, its extra call arguments) for one pass of a request with ControlNet units; (pipe, {})
    when no unit steers this pass."""
    units = check_units(o.control)
    chosen = [k for k, u in enumerate(units) if steers(u, hires_pass)]
    if not chosen:
        return pipe, {}
    images = [control_image(units[k], pictures, k, width, height) for k in chosen]
    units = [units[k] for k in chosen]
    return control_pipeline(pipe, task, units, o.allow_pickle), control_arguments(
        units, images, task, bool(hires_pass)
    )
