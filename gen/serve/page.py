"""The web page at /: plain HTML and a little JS (page/), no build step; it speaks the native jobs API."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

PAGE = Path(__file__).parent / "page"


def router() -> APIRouter:
    api = APIRouter(include_in_schema=False)

    @api.get("/")
    async def index():
        return FileResponse(PAGE / "index.html", media_type="text/html")

    @api.get("/page/app.js")
    async def script():
        return FileResponse(PAGE / "app.js", media_type="text/javascript")

    return api
