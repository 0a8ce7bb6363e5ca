"""What the request means for each model family: the model's own CFG scale where the request leaves it to the
model, the options a family cannot honour (refused in one line before any image work), and the family's call
arguments.

SD 1.x/2.x, SDXL and gen's DiT take every option. SD3 and Flux (flow matching, gen.pipelines.flow) run
text-to-image, image-to-image and inpainting here with their own call arguments; what their pipelines do not
have yet (ControlNet, hires fix, CFG rescale, a guidance interval, OpenVINO) is refused rather than ignored.

Flux's two guidances follow Forge, the A1111-style anchor for Flux users: "CFG scale" (`guidance`) is real
classifier-free guidance, off at its default of 1 (> 1: a second transformer call on the negative prompt, "" if
none, as Forge does); "Distilled CFG Scale" (`distilled_guidance`, default 3.5) is Flux-dev's guidance embedding,
the `guidance_scale` of diffusers' FluxPipeline. Flux-schnell has no guidance embedding: a distilled guidance
given for it, or for any other model, is not applied, as in Forge (A1111 clients send Forge's default to every
model), and said so in the log.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gen.generation.options import hires_on

if TYPE_CHECKING:
    from gen.generation.inputs import InitImages
    from gen.generation.options import Options

# gen's CFG scale for its own and SD models since the first CLI (StableDiffusionPipeline's is 7.5)
GUIDANCE = 5.0
FLOW_GUIDANCE = {"sd3": 7.0, "flux": 1.0}  # StableDiffusion3Pipeline's default; Forge's Flux CFG (off)
DISTILLED_GUIDANCE = 3.5  # FluxPipeline's guidance_scale default, Forge's Distilled CFG Scale default


# Each flow family's pipeline per task (gen.pipelines' names): text-to-image, image-to-image, inpainting.
TASKS = {
    "sd3": {
        "text": "SD3TextToImagePipeline",
        "image": "SD3ImageToImagePipeline",
        "inpaint": "SD3InpaintPipeline",
    },
    "flux": {
        "text": "FluxTextToImagePipeline",
        "image": "FluxImageToImagePipeline",
        "inpaint": "FluxInpaintPipeline",
    },
}


def is_flow(pipe) -> bool:
    return getattr(pipe, "is_flow", False)


def family(pipe) -> str | None:
    """ "sd3" or "flux" for a flow-matching pipeline (any task's), None for gen's and SD's."""
    if not is_flow(pipe):
        return None
    return "flux" if type(pipe).__name__.startswith("Flux") else "sd3"


def is_flux(pipe) -> bool:
    return family(pipe) == "flux"


def task_class(pipe, task: str):
    """The pipeline class for `task` ("text", "image", "inpaint") on `pipe`'s family; ValueError where the family
    has none yet (check_family names it first for the front-ends)."""
    from gen import pipelines as P

    name = family(pipe)
    if name is None:
        return {"text": P.TextToImagePipeline, "image": P.ImageToImagePipeline, "inpaint": P.InpaintPipeline}[
            task
        ]
    if task not in TASKS[name]:
        raise ValueError(f"{task} is not available for {name.upper()} models yet")
    return getattr(P, TASKS[name][task])


def guidance_of(pipe, o: Options) -> float:
    """The CFG scale the images are made with: the request's, else the model's own."""
    if o.guidance is not None:
        return o.guidance
    return FLOW_GUIDANCE.get(family(pipe), GUIDANCE)


def distilled_of(pipe, o: Options) -> float | None:
    """Flux-dev's distilled guidance as applied (None where the model has no guidance embedding)."""
    if not is_flux(pipe) or not pipe.transformer.config.guidance_embeds:
        return None
    return DISTILLED_GUIDANCE if o.distilled_guidance is None else o.distilled_guidance


def not_applied(pipe, o: Options) -> str | None:
    """Why a distilled guidance given is not applied to this model (None if it is, or none was given)."""
    if o.distilled_guidance is None or distilled_of(pipe, o) is not None:
        return None
    what = "Flux-schnell (no guidance embedding)" if is_flux(pipe) else "this model"
    return f"distilled guidance {o.distilled_guidance:g} is Flux-dev's; not applied to {what}"


def check_family(pipe, o: Options, init: InitImages | None = None) -> None:
    """Refuse, before any image work, what this model family cannot do yet (one line naming the option)."""
    if not is_flow(pipe):
        return
    name = "Flux" if is_flux(pipe) else "SD3"
    unsupported = [
        (bool(o.control), "ControlNet (--control)"),
        (hires_on(o), "hires fix"),
        (bool(o.guidance_rescale), "--guidance-rescale"),
        (o.guidance_interval is not None, "--guidance-interval"),
    ]
    for bad, what in unsupported:
        if bad:
            raise ValueError(
                f"{what} is not available for {name} models yet; text-to-image, image-to-image and inpainting are"
            )


def call_arguments(pipe, o: Options, batch: int) -> dict:
    """The family's own call arguments for a batch of `batch` images (the shared ones are the core's)."""
    guidance = guidance_of(pipe, o)
    negative = [o.negative] * batch if o.negative else None
    if is_flux(pipe):
        out = {"true_cfg_scale": guidance, "negative_prompt": [o.negative] * batch if guidance > 1 else None}
        distilled = distilled_of(pipe, o)
        return out | ({"guidance_scale": distilled} if distilled is not None else {})
    if is_flow(pipe):
        return {"guidance_scale": guidance, "negative_prompt": negative}
    return {
        # No negative prompt: None, which SDXL models configured so (force_zeros_for_empty_prompt) read as zeros,
        # as they were trained; SD 1.x/2.x read None as "".
        "negative_prompt": negative,
        "guidance_scale": guidance,
        "guidance_rescale": o.guidance_rescale,
        "guidance_interval": tuple(o.guidance_interval) if o.guidance_interval else None,
    }
