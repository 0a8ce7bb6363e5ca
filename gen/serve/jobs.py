"""gen's own jobs API: submit and get an id and queue position at once, then poll, stream progress and results
as server-sent events, download PNGs, cancel. Jobs are stored (gen.serve.store) before the 202, so a restart
resumes them; finished ones stay for --keep-jobs hours.

    POST   /gen/v1/jobs                      -> 202 {id, status, position, ...}
    POST   /gen/v1/jobs?stream=true          -> the job's events on this connection (hanging up cancels it)
    GET    /gen/v1/jobs/{id}                 -> status, position, progress, images (URLs and parameters)
    GET    /gen/v1/jobs/{id}/events          -> text/event-stream: state, progress, image, then done|failed|...
    GET    /gen/v1/jobs/{id}/images/{k}.png  -> the PNG, with the CLI's metadata
    POST   /gen/v1/jobs/{id}/cancel          -> stop it (queued images dropped, running ones stop if alone);
                                                the job and its finished images stay
    DELETE /gen/v1/jobs/{id}                 -> cancel if unfinished (running images stop if alone), then
                                                forget: its final description; GET is 404 from then on
    GET    /gen/v1/info                      -> models, samplers, limits, queue statistics (the web page reads it)
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

import gen
from gen.control import available
from gen.diffusion.samplers import SAMPLERS
from gen.generation.upscale import UPSCALERS
from gen.serve import sampler_names as samplers
from gen.serve.controlnet import checked_units
from gen.serve.schema import Number, request_field
from gen.serve.state import State
from gen.serve.tasks import ServeError, Task, build_task, read_uploads, request_defaults, request_values

KEEPALIVE_S = 15.0  # a comment line this often keeps proxies from closing a quiet stream


# This API's names -> gen's request fields (gen.generation.Options): the one table. The sampler (gen's or
# A1111's name, with A1111's scheduler) and the uploads are read apart.
NAMES = {
    "prompt": "prompt",
    "negative_prompt": "negative",
    "n": "num_images",
    "seed": "seed",
    "steps": "steps",
    "guidance": "guidance",
    "distilled_guidance": "distilled_guidance",
    "width": "width",
    "height": "height",
    "model": "model",
    "clip_skip": "clip_skip",
    "sdxl_clip_l_skip": "sdxl_clip_l_skip",
    "strength": "strength",
    "mask_blur": "mask_blur",
    "invert_mask": "invert_mask",
    "hires_scale": "hires_scale",
    "hires_width": "hires_width",
    "hires_height": "hires_height",
    "hires_upscaler": "hires_upscaler",
    "hires_steps": "hires_steps",
    "hires_strength": "hires_strength",
    "hires_prompt": "hires_prompt",
    "hires_negative_prompt": "hires_negative",
}


class ControlUnitRequest(BaseModel):
    """A ControlNet unit by gen's names (gen.generation.control_units.ControlUnit): `model` a name from
    /controlnet/model_list (with or without its hash), `image` the picture as raw base64 or a data: URL."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    image: str
    module: str = "none"
    weight: Number = 1.0
    guidance_start: Number = 0.0
    guidance_end: Number = 1.0
    processor_res: int = 512
    threshold_a: Number | None = None
    threshold_b: Number | None = None
    resize_mode: str = "Crop and Resize"
    pixel_perfect: bool = False
    control_mode: str = "Balanced"
    hr_option: str = "Both"


class JobRequest(BaseModel):
    """Unknown fields are refused here (unlike the A1111 and OpenAI routes): a typo should not pass silently."""

    model_config = ConfigDict(extra="forbid", strict=True)  # `"seed": false` is refused, not read as 0

    prompt: str
    negative_prompt: str = request_field("negative")
    n: int = request_field("num_images")
    seed: int | None = None  # None or -1: random
    steps: int | None = request_field("steps", None)
    sampler: str | None = None  # gen's or A1111's name
    scheduler: str | None = None  # A1111's: automatic or karras
    guidance: Number | None = request_field("guidance", None)
    distilled_guidance: Number | None = request_field("distilled_guidance", None)  # Flux-dev's
    width: int | None = request_field("width")
    height: int | None = request_field("height")
    model: str | None = None
    clip_skip: int | None = request_field(
        "clip_skip"
    )  # A1111's numbering: 1 the last layer, 2 the penultimate
    sdxl_clip_l_skip: bool = request_field("sdxl_clip_l_skip")
    # Image-to-image and inpainting: pictures as raw base64 or data: URLs; mask white = repaint
    init_image: str | None = None
    mask: str | None = None
    strength: Number = request_field("strength")
    mask_blur: int = request_field("mask_blur")
    invert_mask: bool = request_field("invert_mask")
    # Hires fix: on with a scale or a size; the upscaler by A1111's name (GET /sdapi/v1/upscalers and
    # /latent-upscale-modes list them); the sampler gen's or A1111's name
    hires_scale: Number | None = request_field("hires_scale")
    hires_width: int | None = request_field("hires_width")
    hires_height: int | None = request_field("hires_height")
    hires_upscaler: str = request_field("hires_upscaler")
    hires_steps: int = request_field("hires_steps")
    hires_strength: Number = request_field("hires_strength")
    hires_sampler: str | None = None
    hires_prompt: str = request_field("hires_prompt")
    hires_negative_prompt: str = request_field("hires_negative")
    # ControlNet units (GET /controlnet/model_list and /controlnet/module_list name the models and modules)
    control: list[ControlUnitRequest] = []


def to_task(state: State, body: JobRequest) -> Task:
    """The job's fields in gen's terms (NAMES), its uploads decoded, checked before it queues."""
    try:
        sampler = samplers.resolve(body.sampler, body.scheduler)
    except ValueError as e:
        raise ServeError(422, str(e)) from None
    values = {**request_values(body, NAMES), "sampler": sampler}
    if body.hires_sampler is not None:
        try:
            values["hires_sampler"] = samplers.resolve(body.hires_sampler)
        except ValueError as e:
            raise ServeError(422, f"hires_sampler: {e}") from None
    init = None
    if body.init_image:
        init = read_uploads(values, body.init_image, body.mask, state.config.max_pixels)
    elif body.mask:  # refused by the request's own rule (gen.generation.options.check_init)
        values["mask"] = "upload"
    units = [u.model_dump(exclude={"image"}) for u in body.control]
    values["control"], control = checked_units(state, units, [u.image for u in body.control])
    return build_task(state.config, state.models, values, init, control)


def describe(state: State, task: Task) -> dict:
    prefix = f"/gen/v1/jobs/{task.id}"
    o = task.options
    return {
        "id": task.id,
        "status": task.status,
        "position": state.queue.position(task),
        "progress": {"step": task.step, "steps": task.steps},
        "prompt": o.prompt,
        "seed": o.seed,
        "n": len(task.jobs),
        "model": task.model.title,
        "created": task.created,
        "images": [
            {
                "index": r.index,
                "seed": r.seed,
                "url": f"{prefix}/images/{r.index}.png",
                "parameters": r.parameters,
            }
            for r in task.images()
        ],
        "error": task.error.message if task.error else None,
    }


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


async def events(state: State, task: Task, cancel_on_close: bool = False) -> AsyncIterator[str]:
    """`state` on every change (position, progress), `image` once per finished image, then one final event
    named by the outcome (done, failed, cancelled, interrupted) with the whole job."""
    sent, last = set(), None
    try:
        while True:
            view = describe(state, task)
            for image in view["images"]:
                if image["index"] not in sent:
                    sent.add(image["index"])
                    yield _event("image", image)
            if task.done:
                yield _event(task.status, view)
                return
            now = {k: view[k] for k in ("id", "status", "position", "progress")}
            if now != last:
                last = now
                yield _event("state", now)
            if not await task.changed(KEEPALIVE_S):
                yield ": keep-alive\n\n"
    finally:
        if cancel_on_close and not task.done:  # the client hung up on a job tied to its connection
            state.queue.cancel(task)


def _stream(generator: AsyncIterator[str]) -> StreamingResponse:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(generator, media_type="text/event-stream", headers=headers)


def router(state: State) -> APIRouter:
    api = APIRouter(prefix="/gen/v1", tags=["gen jobs"])

    def find(job_id: str) -> Task:
        task = state.job(job_id)
        if task is None:
            raise ServeError(
                404, f"no job {job_id!r} here (deleted, or finished more than --keep-jobs hours ago)"
            )
        return task

    @api.post("/jobs", status_code=202)
    async def submit(body: JobRequest, stream: bool = False):
        task = to_task(state, body)
        state.accept(task)  # stored (with --state-dir) before this answers
        if stream:
            return _stream(events(state, task, cancel_on_close=True))
        return JSONResponse(
            describe(state, task), status_code=202, headers={"Location": f"/gen/v1/jobs/{task.id}"}
        )

    @api.get("/jobs/{job_id}")
    async def get(job_id: str):
        return describe(state, find(job_id))

    @api.post("/jobs/{job_id}/cancel")
    async def cancel(job_id: str):
        task = find(job_id)
        state.queue.cancel(task)
        return describe(state, task)  # kept: its finished images stay downloadable

    @api.delete("/jobs/{job_id}")
    async def delete(job_id: str):
        task = find(job_id)
        state.forget(task)
        return describe(state, task)  # its final state; a GET now is 404

    @api.get("/jobs/{job_id}/events")
    async def job_events(job_id: str):
        return _stream(events(state, find(job_id)))

    @api.get("/jobs/{job_id}/images/{index}.png")
    async def image(job_id: str, index: int):
        task = find(job_id)
        result = task.results[index] if 0 <= index < len(task.results) else None
        if result is None:
            raise ServeError(404, f"job {job_id} has no finished image {index}")
        disposition = f'attachment; filename="gen-{result.seed}.png"'
        return Response(result.png, media_type="image/png", headers={"Content-Disposition": disposition})

    @api.get("/info")
    async def info():
        c, q = state.config, state.queue
        return {
            "version": gen.__version__,
            "models": [
                {"title": m.title, "name": m.name, "default_size": m.default_size, "samplers": m.samplers}
                for m in state.models
            ],
            "samplers": [{"name": n, "label": s.a1111} for n, s in SAMPLERS.items()],
            "defaults": request_defaults(c),
            "upscalers": list(UPSCALERS),
            "controlnets": list(state.controlnets),
            "control_modules": available(),
            "limits": {
                k: getattr(c, k) for k in ("max_batch", "max_queue", "max_pixels", "max_steps", "max_images")
            },
            "queue": {"waiting": len(q.queued_tasks()), "running": len(q.running_tasks()), **q.stats},
        }

    return api
