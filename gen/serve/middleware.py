"""ASGI middleware that answers before routing: authentication (so a wrong password gets 401, never a 404 or
405 that would reveal which routes exist) and the request body limit (before a large body is read)."""

from __future__ import annotations

import base64
import binascii
import hmac

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from gen.serve.errors import error_response, is_openai


def _equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())  # constant time: no timing hint at the secret


def basic_ok(header: str, credentials: list[tuple[str, str]]) -> bool:
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, sep, password = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return False
    ok = False
    for u, p in credentials:  # every entry compared, whichever matches: the time does not say which
        ok |= _equal(user, u) & _equal(password, p) & bool(sep)
    return ok


def bearer_ok(header: str, key: str) -> bool:
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and _equal(token.strip(), key)


class Auth:
    """--api-auth: HTTP Basic on every route; --api-key: Bearer on /v1 (OpenAI clients send only that)."""

    def __init__(self, app: ASGIApp, credentials: list[tuple[str, str]], api_key: str | None):
        self.app, self.credentials, self.api_key = app, credentials, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, header = scope["path"], Headers(scope=scope).get("authorization", "")
        if self.api_key is not None and is_openai(path):
            ok, challenge = bearer_ok(header, self.api_key), "Bearer"
        elif self.credentials:
            ok, challenge = basic_ok(header, self.credentials), 'Basic realm="gen"'
        else:
            ok, challenge = True, ""
        if ok:
            await self.app(scope, receive, send)
            return
        message = "missing or wrong credentials" + (" (Bearer API key)" if challenge == "Bearer" else "")
        response = error_response(path, 401, message, headers={"WWW-Authenticate": challenge})
        await response(scope, receive, send)


class BodyLimit:
    """Refuse request bodies over `limit` bytes with a JSON 413: at once when Content-Length says so, else when
    the streamed body passes the limit (raised as an HTTPException, so the app's JSON error handler answers).
    Starlette's own limiter answers in plain text."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    def message(self) -> str:
        return f"request body is larger than this server accepts ({self.limit} bytes)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            response = error_response(scope["path"], 413, self.message(), headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, self.message())
            return message

        await self.app(scope, limited_receive, send)
