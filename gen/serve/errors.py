"""Every error as one JSON line a client can show: {"error": kind, "detail": message}, or OpenAI's
{"error": {"message", "type", "param", "code"}} under /v1, so the openai package raises its own typed errors."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from gen.serve.tasks import ServeError

logger = logging.getLogger(__name__)

KINDS = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    422: "invalid_request",
    429: "queue_full",
    503: "unavailable",
}


def is_openai(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def error_response(
    path: str, status: int, message: str, kind: str | None = None, headers=None
) -> JSONResponse:
    kind = kind or KINDS.get(status, "error")
    if is_openai(path):
        # OpenAI answers bad requests with 400, never 422.
        status = 400 if status == 422 else status
        body = {"error": {"message": message, "type": _openai_type(status), "param": None, "code": kind}}
    else:
        body = {"error": kind, "detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


def _openai_type(status: int) -> str:
    return {401: "authentication_error", 429: "rate_limit_exceeded", 503: "server_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )


def describe_validation(e: RequestValidationError) -> str:
    """Pydantic's errors as one line: where, what was wrong."""
    parts = []
    for err in e.errors():
        if err.get("type") == "json_invalid":
            reason = (err.get("ctx") or {}).get("error", "invalid JSON")
            parts.append(f"the request body is not valid JSON ({reason}, at character {err['loc'][-1]})")
            continue
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        value = err.get("input")
        if err.get("type") != "missing" and isinstance(value, (int, float, str)) and len(repr(value)) <= 60:
            where += f"={value!r}"  # the bad value itself, when it is short enough to read
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)[:1000] or "invalid request"


def install(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def serve_error(request: Request, e: ServeError):
        return error_response(request.url.path, e.status, e.message, e.kind, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return error_response(request.url.path, 422, describe_validation(e))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        headers, status = dict(e.headers or {}), e.status_code
        if status == 400 and not is_openai(request.url.path):  # a body FastAPI cannot parse: as bad JSON, 422
            status = 422
        if status == 405:  # Starlette names the first matching route's methods only
            headers["Allow"] = ", ".join(allowed_methods(app, request))
        return error_response(request.url.path, status, str(e.detail), headers=headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(request.url.path, 500, f"internal error: {type(e).__name__}", "internal")


def allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Every method some route takes at this path (FastAPI makes one route per method)."""
    methods = set()
    for route in app.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE and getattr(route, "methods", None):
            methods |= route.methods
    return sorted(methods)
