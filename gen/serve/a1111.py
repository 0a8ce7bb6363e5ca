"""AUTOMATIC1111's /sdapi/v1 API, the subset front-ends use: field names and response shapes as A1111's
modules/api/models.py and api.py. Unknown request fields are ignored (clients send A1111's whole schema).

Each generation route is a request model (GenerationFields plus its own fields) and a few lines around
`generate`; another route (img2img) is one more model and one more function registered in `router`.
"""

from __future__ import annotations

import json
import time

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from pydantic import BaseModel, ConfigDict, Field

import gen
from gen import generation as G
from gen.diffusion.samplers import SAMPLERS
from gen.generation.clip_skip import DEFAULT as DEFAULT_CLIP_SKIP
from gen.generation.clip_skip import pipeline_clip_skip
from gen.generation.families import guidance_of
from gen.serve import sampler_names as samplers
from gen.serve.controlnet import read_units
from gen.serve.results import decode_image, parse_parameters
from gen.serve.schema import Number, request_field
from gen.serve.state import State
from gen.serve.tasks import ServeError, Task, build_task, read_uploads, request_values

# A1111's request fields -> gen's request fields (gen.generation.Options), the one table of this API's names.
# The checkpoint, Clip skip, sampler and image count are read apart (settings, two names, batch_size x n_iter).
NAMES = {
    "prompt": "prompt",
    "negative_prompt": "negative",
    "seed": "seed",
    "steps": "steps",
    "cfg_scale": "guidance",
    "distilled_cfg_scale": "distilled_guidance",  # Forge's name, for Flux
    "width": "width",
    "height": "height",
}
IMG2IMG_NAMES = {
    "denoising_strength": "strength",
    "mask_blur": "mask_blur",
    "inpainting_mask_invert": "invert_mask",
}


class GenerationFields(BaseModel):
    """What every A1111 generation request may say (A1111's names). None: gen's default."""

    # strict: `"seed": false` or `"steps": "20"` is refused, not read as 0 and 20
    model_config = ConfigDict(extra="ignore", strict=True)

    prompt: str = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int | None = -1
    sampler_name: str | None = None
    sampler_index: str | None = None  # A1111's older name for the sampler
    scheduler: str | None = None
    batch_size: int | None = Field(1, ge=1)
    n_iter: int | None = Field(1, ge=1)
    steps: int | None = request_field("steps", None)
    cfg_scale: Number | None = request_field("guidance", None)
    distilled_cfg_scale: Number | None = request_field("distilled_guidance", None)
    width: int | None = request_field("width", None)
    height: int | None = request_field("height", None)
    override_settings: dict | None = None
    send_images: bool | None = True
    # sd-webui-controlnet's units under "controlnet" (any case): gen.serve.controlnet reads them
    alwayson_scripts: dict | None = None


# txt2img's hires fix fields -> gen's, read when enable_hr is true; A1111's 0 for "no resize" is None in gen
HIRES_NAMES = {
    "hr_scale": "hires_scale",
    "hr_upscaler": "hires_upscaler",
    "hr_second_pass_steps": "hires_steps",
    "denoising_strength": "hires_strength",
    "hr_prompt": "hires_prompt",
    "hr_negative_prompt": "hires_negative",
}


class Txt2ImgRequest(GenerationFields):
    """txt2img's hires fix: A1111's names; `hr_scale` applies unless `hr_resize_x`/`hr_resize_y` give a size."""

    enable_hr: bool | None = False
    hr_scale: Number | None = request_field("hires_scale", 2.0)  # A1111's default when enable_hr is on
    hr_upscaler: str | None = None  # None: "Latent"
    hr_second_pass_steps: int | None = request_field("hires_steps")
    hr_resize_x: int | None = Field(0, ge=0)
    hr_resize_y: int | None = Field(0, ge=0)
    hr_sampler_name: str | None = None  # None: the first pass's
    hr_scheduler: str | None = None
    hr_prompt: str | None = ""
    hr_negative_prompt: str | None = ""
    denoising_strength: Number | None = request_field("hires_strength")


def hires_values(body: Txt2ImgRequest) -> dict:
    """The hires fix fields in gen's terms (HIRES_NAMES), or none when enable_hr is off."""
    if not body.enable_hr:
        return {}
    values = request_values(body, HIRES_NAMES)
    if body.hr_resize_x or body.hr_resize_y:  # a size instead of a scale
        values.pop("hires_scale", None)
        values |= {"hires_width": body.hr_resize_x or None, "hires_height": body.hr_resize_y or None}
    if body.hr_sampler_name:
        try:
            values["hires_sampler"] = samplers.resolve(body.hr_sampler_name, body.hr_scheduler)
        except ValueError as e:
            raise ServeError(422, f"hr_sampler_name: {e}") from None
    return values


class Img2ImgRequest(GenerationFields):
    """A1111's img2img fields gen reads: the first of `init_images`, `mask` (white = repaint), `mask_blur`,
    `inpainting_mask_invert`, `denoising_strength`. Images as raw base64 or data: URLs."""

    init_images: list[str] = Field(min_length=1)  # gen reads the first; A1111 clients always send it
    denoising_strength: Number | None = request_field("strength")
    mask: str | None = None
    mask_blur: int | None = request_field("mask_blur")
    inpainting_mask_invert: int | None = 0


class GenerationResponse(BaseModel):
    images: list[str] | None = None
    parameters: dict
    info: str


class PngInfoRequest(BaseModel):
    image: str


def to_values(state: State, body: GenerationFields) -> dict:
    """A1111's fields in gen's terms (NAMES); the checkpoint and Clip skip settings from override_settings, else
    from /options."""
    overrides = body.override_settings or {}
    settings = {**state.options, **overrides}
    clip_skip = settings.get("CLIP_stop_at_last_layers")
    try:
        sampler = samplers.resolve(body.sampler_name or body.sampler_index, body.scheduler)
    except ValueError as e:
        raise ServeError(422, str(e)) from None
    return {
        **request_values(body, NAMES),
        "num_images": (body.batch_size or 1) * (body.n_iter or 1),
        "sampler": sampler,
        "model": overrides.get("sd_model_checkpoint") or state.options.get("sd_model_checkpoint"),
        # A1111's default as None: these requests share batches with the other APIs' (the same pictures)
        "clip_skip": None if type(clip_skip) is int and clip_skip == DEFAULT_CLIP_SKIP else clip_skip,
        "sdxl_clip_l_skip": settings.get("sdxl_clip_l_skip", False),
    }


def img2img_task(state: State, body: Img2ImgRequest) -> Task:
    """The txt2img fields plus the first init image and the mask, decoded and checked before queueing; ControlNet
    units without an image of their own read the init image, as sd-webui-controlnet's do."""
    values = {**to_values(state, body), **request_values(body, IMG2IMG_NAMES)}
    values["invert_mask"] = bool(values.get("invert_mask", 0))
    init = read_uploads(values, body.init_images[0], body.mask, state.config.max_pixels)
    values["control"], control = read_units(state, body.alwayson_scripts, body.init_images[0])
    return build_task(state.config, state.models, values, init, control)


def _without_pictures(body: GenerationFields) -> GenerationFields:
    """The request as the response's `parameters` echo it: ControlNet units without their pictures."""
    if not body.alwayson_scripts:
        return body
    scripts = {
        name: {**entry, "args": [_unit_echo(u) for u in entry.get("args", [])]}
        if name.lower() == "controlnet" and isinstance(entry, dict) and isinstance(entry.get("args"), list)
        else entry
        for name, entry in body.alwayson_scripts.items()
    }
    return body.model_copy(update={"alwayson_scripts": scripts})


def _unit_echo(unit):
    if not isinstance(unit, dict):
        return unit
    return {k: v for k, v in unit.items() if k not in ("image", "input_image", "mask", "mask_image")}


def info(task: Task, body: GenerationFields) -> dict:
    """A1111's `info` (Processed.js()): the keys its clients read, with gen's values."""
    o, made = task.options, task.images()
    sampler = made[0].sampler if made else SAMPLERS[o.sampler].a1111 if o.sampler else None
    seeds = [job.seed for job in task.jobs]
    return {
        "prompt": o.prompt,
        "all_prompts": [job.prompt for job in task.jobs],
        "negative_prompt": o.negative,
        "all_negative_prompts": [o.negative] * len(task.jobs),
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0,
        "width": o.width,
        "height": o.height,
        "sampler_name": sampler,
        "cfg_scale": guidance_of(task.model.pipe, o),  # as applied: the request's, else the model's own
        "steps": o.steps,
        "batch_size": body.batch_size or 1,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": task.model.name,
        "sd_model_hash": task.model.hash,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": o.strength
        if task.init is not None
        else o.hires_strength
        if G.hires_on(o)
        else None,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": [r.parameters for r in made],
        "styles": body.styles or [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(task.created)),
        "clip_skip": o.clip_skip or DEFAULT_CLIP_SKIP,
        "is_using_inpainting_conditioning": task.init is not None and task.init.mask is not None,
        "version": f"gen {gen.__version__}",
        "status": task.status,  # gen's: "interrupted" when /interrupt stopped it (finished images only)
    }


async def generate(state: State, http: HttpRequest, body: GenerationFields, task: Task) -> GenerationResponse:
    """Queue, wait, answer as A1111 does: base64 PNGs (with the CLI's metadata), the request, info JSON."""
    await state.run(task, http)
    if task.status == "failed":
        raise task.error
    images = [r.b64() for r in task.images()] if body.send_images is not False else []
    return GenerationResponse(images=images, parameters=body.model_dump(), info=json.dumps(info(task, body)))


def progress(state: State) -> dict:
    """A1111's /progress: the running batch's steps; job_count counts requests running or queued."""
    q = state.queue
    running = q.running_tasks()
    count = len(dict.fromkeys([*running, *q.waiting]))  # a request split over batches counts once
    base = {"skipped": False, "interrupted": q.interrupted, "stopping_generation": False, "job_no": 0}
    if not running:
        idle = {
            **base,
            "job": "",
            "job_count": count,
            "job_timestamp": "0",
            "sampling_step": 0,
            "sampling_steps": 0,
        }
        return {"progress": 0.0, "eta_relative": 0.0, "state": idle, "current_image": None, "textinfo": None}
    fraction = max(0.01, min(1.0, q.step / max(q.steps, 1)))
    elapsed = time.time() - q.batch_started
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(q.batch_started))
    return {
        "progress": fraction,
        "eta_relative": elapsed / fraction - elapsed,
        "state": {
            **base,
            "job": running[0].id,
            "job_count": count,
            "job_timestamp": stamp,
            "sampling_step": q.step,
            "sampling_steps": q.steps,
        },
        "current_image": None,
        "textinfo": None,
    }


def router(state: State) -> APIRouter:
    api = APIRouter(prefix="/sdapi/v1", tags=["A1111"])
    _generation_routes(api, state)
    _other_routes(api, state)
    return api


def _generation_routes(api: APIRouter, state: State) -> None:
    @api.post("/txt2img", response_model=GenerationResponse)
    async def txt2img(body: Txt2ImgRequest, http: HttpRequest):
        values = {**to_values(state, body), **hires_values(body)}
        values["control"], control = read_units(state, body.alwayson_scripts)
        task = build_task(state.config, state.models, values, control=control)
        return await generate(state, http, _without_pictures(body), task)

    @api.post("/img2img", response_model=GenerationResponse)
    async def img2img(body: Img2ImgRequest, http: HttpRequest):
        task = img2img_task(state, body)
        # As A1111: the response's parameters leave out the uploaded pictures.
        body = _without_pictures(body).model_copy(update={"init_images": None, "mask": None})
        return await generate(state, http, body, task)


def _other_routes(api: APIRouter, state: State) -> None:
    @api.get("/samplers")
    async def get_samplers():
        return samplers.a1111_samplers()

    @api.get("/schedulers")
    async def get_schedulers():
        return samplers.SCHEDULERS

    @api.get("/sd-models")
    async def sd_models():
        return [m.a1111() for m in state.models]

    @api.get("/options")
    async def get_options():
        return state.options

    @api.post("/options")
    async def set_options(body: dict):
        if "sd_model_checkpoint" in body:
            try:
                model = state.models.find(body["sd_model_checkpoint"])
            except ValueError as e:
                raise ServeError(422, str(e)) from None
            body = {**body, "sd_model_checkpoint": model.title, "sd_checkpoint_hash": model.sha256}
        settings = {**state.options, **body}
        try:  # checked when set, as the checkpoint is: a bad value fails here, not in every later request
            clip_skip, flag = settings["CLIP_stop_at_last_layers"], settings["sdxl_clip_l_skip"]
            G.check_a1111_clip_skip(clip_skip, flag)
            pipeline_clip_skip(state.models.find(settings["sd_model_checkpoint"]).pipe, clip_skip, flag)
        except ValueError as e:
            raise ServeError(422, str(e)) from None
        state.options.update(body)
        return None

    @api.get("/progress")
    async def get_progress(skip_current_image: bool = False):
        return progress(state)

    @api.post("/interrupt")
    async def interrupt():
        state.queue.interrupt()
        return None

    @api.post("/png-info")
    async def png_info(body: PngInfoRequest):
        if not body.image.strip():
            return {"info": "", "items": {}, "parameters": {}}
        try:
            image = decode_image(body.image, state.config.max_pixels)
        except ValueError as e:
            raise ServeError(422, str(e)) from None
        text = {k: v for k, v in getattr(image, "text", {}).items() if isinstance(v, str)}
        parameters = text.pop("parameters", "")
        return {
            "info": parameters,
            "items": text,
            "parameters": parse_parameters(parameters) if parameters else {},
        }

    @api.get("/scripts")
    async def scripts():  # clients (webuiapi) probe this for extensions: there are none
        return {"txt2img": [], "img2img": []}
