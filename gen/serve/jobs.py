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
from pydantic import BaseModel, ConfigDict, Field

import gen
from gen.diffusion.samplers import SAMPLERS
from gen.serve import samplers
from gen.serve.schema import Number
from gen.serve.state import State
from gen.serve.tasks import Request, ServeError, Task, add_init, build_task, request_defaults

KEEPALIVE_S = 15.0  # a comment line this often keeps proxies from closing a quiet stream


class JobRequest(BaseModel):
    """Unknown fields are refused here (unlike the A1111 and OpenAI routes): a typo should not pass silently."""

    model_config = ConfigDict(extra="forbid", strict=True)  # `"seed": false` is refused, not read as 0

    prompt: str
    negative_prompt: str = ""
    n: int = Field(1, ge=1)
    seed: int | None = None
    steps: int | None = Field(None, ge=1)
    sampler: str | None = None  # gen's or A1111's name
    scheduler: str | None = None  # A1111's: automatic or karras
    guidance: Number | None = Field(None, allow_inf_nan=False)
    width: int | None = Field(None, ge=1)
    height: int | None = Field(None, ge=1)
    model: str | None = None
    clip_skip: int | None = Field(None, ge=1)  # A1111's numbering: 1 the last layer, 2 the penultimate
    sdxl_clip_l_skip: bool = False  # apply clip_skip to SDXL's first encoder (A1111's "Clip skip SDXL")
    # Image-to-image and inpainting: pictures as raw base64 or data: URLs; mask white = repaint
    init_image: str | None = None
    mask: str | None = None
    strength: Number = Field(0.75, ge=0, le=1, allow_inf_nan=False)
    mask_blur: int = Field(4, ge=0)
    invert_mask: bool = False


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
        try:
            sampler = samplers.resolve(body.sampler, body.scheduler)
        except ValueError as e:
            raise ServeError(422, str(e)) from None
        request = Request(
            prompt=body.prompt,
            negative=body.negative_prompt,
            n=body.n,
            seed=body.seed,
            steps=body.steps,
            sampler=sampler,
            guidance=body.guidance,
            width=body.width,
            height=body.height,
            model=body.model,
            clip_skip=body.clip_skip,
            sdxl_clip_l_skip=body.sdxl_clip_l_skip,
        )
        if body.init_image:
            add_init(
                request,
                body.init_image,
                body.mask,
                body.strength,
                body.mask_blur,
                body.invert_mask,
                state.config.max_pixels,
            )
        elif body.mask:
            raise ServeError(422, "mask needs init_image (the picture to inpaint)")
        task = build_task(state.config, state.models, request)
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
                {"title": m.title, "name": m.name, "default_size": m.default_size} for m in state.models
            ],
            "samplers": [{"name": n, "label": s.a1111} for n, s in SAMPLERS.items()],
            "defaults": request_defaults(c),
            "limits": {
                k: getattr(c, k) for k in ("max_batch", "max_queue", "max_pixels", "max_steps", "max_images")
            },
            "queue": {"waiting": len(q.queued_tasks()), "running": len(q.running_tasks()), **q.stats},
        }

    return api
