"""What /openapi.json says of every route, made true: the error bodies and status codes the routes really return
(gen.serve.errors writes them), the media types of streams and images, and this server's limits, so a client
generated from the spec, or a fuzzer reading it, knows what is accepted.

FastAPI documents every route with a 422 of its own validation shape (`detail`: a list); gen answers every error
as one line ({"error", "detail": str}, or OpenAI's {"error": {...}} under /v1, always 400 there), so the spec is
rewritten here once, after FastAPI builds it, rather than by `responses=` on each route.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import Field, Strict

from gen.generation.fields import specs
from gen.generation.options import Options
from gen.serve.config import ServeConfig

# A JSON number, never `true`/`false` or a numeric string (pydantic's lax mode would take `"guidance": false`
# as 0.0); integers are numbers too.
Number = Annotated[float, Strict()]


def request_field(name: str, default: Any = ...) -> Any:
    """A pydantic Field for an API field that carries request field `name`: its bounds and help from the request's
    Spec (gen.generation.Options), written there once. `default` is the request's own unless given (None: "not
    given", the request's default applies)."""
    _, spec, _ = specs(Options)[name]
    if default is ...:
        default = Options.__dataclass_fields__[name].default
    bounds: dict[str, Any] = {"ge": spec.ge}
    if (
        isinstance(default, float) or spec.finite
    ):  # a bounded fraction (strength) says its top in the schema too
        bounds |= {"le": spec.le, "allow_inf_nan": not spec.finite}
    return Field(default, description=spec.help, **{k: v for k, v in bounds.items() if v is not None})


ERROR = {
    "type": "object",
    "required": ["error", "detail"],
    "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
}
OPENAI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
WHY = {
    400: "Bad request (one line in error.message)",
    401: "Missing or wrong credentials (--api-auth, --api-key)",
    404: "No such job, image or model",
    413: "Body larger than --max-body-mb",
    422: "Invalid request (one line in detail)",
    429: "Queue full; see Retry-After",
    503: "Shutting down",
}
GENERATION = {
    ("post", "/sdapi/v1/txt2img"),
    ("post", "/sdapi/v1/img2img"),
    ("post", "/gen/v1/jobs"),
    ("post", "/v1/images/generations"),
}
# Responses that are not JSON: (method, path) -> status, media type, description
MEDIA = {
    ("post", "/gen/v1/jobs"): ("200", "text/event-stream", "With ?stream=true: the job's server-sent events"),
    ("get", "/gen/v1/jobs/{job_id}/events"): ("200", "text/event-stream", "The job's server-sent events"),
    ("get", "/gen/v1/jobs/{job_id}/images/{index}.png"): ("200", "image/png", "The PNG, with gen's metadata"),
}
# One server-sent event, as a client's parser yields it (data: the JSON text of the job's state or image)
EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "event": {"enum": ["state", "image", "done", "failed", "cancelled", "interrupted"]},
        "data": {"type": "string"},
    },
}
# Request fields bounded by this server's flags: field name -> ServeConfig attribute
LIMITS = {"steps": "max_steps", "n": "max_images", "batch_size": "max_images", "n_iter": "max_images"}


def document(app: FastAPI, config: ServeConfig) -> None:
    """Make app.openapi() return the spec as the routes behave under `config`."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
            schemas["Error"], schemas["OpenAIError"] = ERROR, OPENAI_ERROR
            for path, operations in spec["paths"].items():
                for method, operation in operations.items():
                    _responses(path, method, operation, config)
            for schema in schemas.values():
                _limits(schema, config)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi


def _responses(path: str, method: str, operation: dict, config: ServeConfig) -> None:
    responses = operation.setdefault("responses", {})
    responses.pop("422", None)  # FastAPI's validation shape; gen's is declared below
    openai = path == "/v1" or path.startswith("/v1/")
    ref = {"$ref": "#/components/schemas/" + ("OpenAIError" if openai else "Error")}
    for status in sorted(_error_statuses(path, method, operation, config)):
        responses[str(status)] = {
            "description": WHY[status],
            "content": {"application/json": {"schema": ref}},
        }
    if (method, path) in MEDIA:
        _media(responses, method, path)


def _error_statuses(path: str, method: str, operation: dict, config: ServeConfig) -> set[int]:
    """The error statuses this operation can answer (gen.serve.errors, the routes, the middleware)."""
    openai = path == "/v1" or path.startswith("/v1/")
    generation = (method, path) in GENERATION
    statuses = set()
    if operation.get("parameters") or operation.get("requestBody"):
        statuses.add(400 if openai else 422)
    if generation or any(p.get("in") == "path" for p in operation.get("parameters", [])):
        statuses.add(404)
    if operation.get("requestBody"):
        statuses.add(413)
    if generation:
        statuses |= {429, 503}
    if config.api_auth or (config.api_key and openai):
        statuses.add(401)
    return statuses


def _media(responses: dict, method: str, path: str) -> None:
    """A stream or image response: its media type replaces JSON, or (POST /gen/v1/jobs?stream=true) joins it."""
    status, media, description = MEDIA[(method, path)]
    body = {"schema": EVENT if media == "text/event-stream" else {"type": "string", "format": "binary"}}
    entry = responses.setdefault(status, {"description": description, "content": {}})
    if (method, path) != ("post", "/gen/v1/jobs"):
        entry["content"] = {}  # the route returns this media type only
    entry["content"][media] = body


def _limits(schema: dict[str, Any], config: ServeConfig) -> None:
    """`maximum` on the request fields this server bounds (integers, maybe nullable)."""
    for name, prop in schema.get("properties", {}).items():
        if name not in LIMITS:
            continue
        for branch in prop.get("anyOf", [prop]):
            if branch.get("type") == "integer":
                branch["maximum"] = getattr(config, LIMITS[name])
