"""OpenAI's images API (POST /v1/images/generations, GET /v1/models), as the `openai` package calls it.

Images come back as b64_json only: a stateless server keeps no files to link to. Fields OpenAI defines but gen
has no use for (quality, style, user, ...) are ignored; `seed`, `negative_prompt`, `steps`, `guidance_scale` and
`sampler` are gen's extensions (the openai package sends them with extra_body=...).
"""

from __future__ import annotations

import re
import time

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from pydantic import BaseModel, ConfigDict

from gen.serve import sampler_names as samplers
from gen.serve.schema import Number, request_field
from gen.serve.state import State
from gen.serve.tasks import ServeError, build_task, request_values

# Clients hard-code OpenAI's model names; they mean "the default model" here.
OPENAI_MODELS = re.compile(r"^(dall-e-\d|gpt-image-[\w.-]+)$")


# OpenAI's names (and gen's extensions) -> gen's request fields (gen.generation.Options): the one table. The
# model, size and sampler are read apart (OpenAI's model names, "WxH").
NAMES = {
    "prompt": "prompt",
    "n": "num_images",
    "seed": "seed",
    "negative_prompt": "negative",
    "steps": "steps",
    "guidance_scale": "guidance",
}


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # `"seed": false` is refused, not read as 0

    prompt: str
    model: str | None = None
    n: int | None = request_field("num_images")
    size: str | None = None  # "WxH" or "auto"
    response_format: str | None = "b64_json"
    seed: int | None = None
    negative_prompt: str | None = None
    steps: int | None = request_field("steps", None)
    guidance_scale: Number | None = request_field("guidance", None)
    sampler: str | None = None


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None or size == "auto":
        return None, None
    match = re.fullmatch(r"(\d{1,6})x(\d{1,6})", size.strip())
    if not match:
        raise ServeError(400, f"size {size!r} must be WIDTHxHEIGHT in pixels, e.g. 64x64, or auto")
    return int(match[1]), int(match[2])


def router(state: State) -> APIRouter:
    api = APIRouter(prefix="/v1", tags=["OpenAI"])

    @api.post("/images/generations")
    async def generations(body: ImageRequest, http: HttpRequest):
        if body.response_format not in (None, "b64_json"):
            raise ServeError(400, f"response_format {body.response_format!r} is not supported; use b64_json")
        model = None if body.model is None or OPENAI_MODELS.match(body.model) else body.model
        try:
            sampler = samplers.resolve(body.sampler)
        except ValueError as e:
            raise ServeError(400, str(e)) from None
        try:
            state.models.find(model)
        except ValueError as e:
            raise ServeError(404, str(e), "model_not_found") from None
        width, height = parse_size(body.size)
        values = {**request_values(body, NAMES), "sampler": sampler, "model": model}
        values |= {k: v for k, v in (("width", width), ("height", height)) if v is not None}
        task = await state.run(build_task(state.config, state.models, values), http)
        if task.status == "failed":
            raise task.error
        data = [{"b64_json": r.b64(), "revised_prompt": r.prompt, "seed": r.seed} for r in task.images()]
        return {"created": int(task.created), "data": data}

    @api.get("/models")
    async def models():
        created = int(time.time())
        data = [
            {"id": m.name, "object": "model", "created": created, "owned_by": "gen"} for m in state.models
        ]
        return {"object": "list", "data": data}

    return api
