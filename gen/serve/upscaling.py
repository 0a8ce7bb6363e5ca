"""A1111's upscaling routes: the upscaler lists and /extra-single-image's resize, with the same pixel upscalers
as hires fix (gen.generation.upscale). No ESRGAN-family weights ship with gen, so only the resizers are listed."""

from __future__ import annotations

import base64
import io

import PIL.Image
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from gen.generation.upscale import LATENT_MODES, PIXEL_FILTERS, check_upscaler, cover, resize_image
from gen.serve.results import decode_image
from gen.serve.schema import Number
from gen.serve.state import State
from gen.serve.tasks import ServeError


class ExtrasSingleImageRequest(BaseModel):
    """A1111's /extra-single-image, the resize part: by `upscaling_resize` (resize_mode 0) or to
    `upscaling_resize_w` x `upscaling_resize_h` (1, cropped to it unless `upscaling_crop` is false), with
    `upscaler_1` blended with `upscaler_2` at `extras_upscaler_2_visibility`. Face restoration is not offered."""

    model_config = ConfigDict(extra="ignore", strict=True)

    image: str
    resize_mode: int = Field(0, ge=0, le=1)
    upscaling_resize: Number = Field(2.0, gt=0, allow_inf_nan=False)
    upscaling_resize_w: int = Field(512, ge=1)
    upscaling_resize_h: int = Field(512, ge=1)
    upscaling_crop: bool = True
    upscaler_1: str | None = "None"
    upscaler_2: str | None = "None"
    extras_upscaler_2_visibility: Number = Field(0.0, ge=0, le=1, allow_inf_nan=False)


def extras(body: ExtrasSingleImageRequest, max_pixels: int) -> dict:
    """The resized picture as A1111 answers it: {"html_info", "image"}; 422 for a bad picture, an unknown
    upscaler (with the list) or a size over --max-pixels."""
    try:
        image = decode_image(body.image, max_pixels).convert("RGB")
        for name in (body.upscaler_1, body.upscaler_2):
            check_upscaler(name or "None", tuple(PIXEL_FILTERS))
        w, h = image.size
        if body.resize_mode == 0:
            to_w, to_h = int(w * body.upscaling_resize), int(h * body.upscaling_resize)
        else:
            to_w, to_h = body.upscaling_resize_w, body.upscaling_resize_h
            if not body.upscaling_crop:  # A1111: scaled to cover, not cropped
                to_w, to_h = cover(w, h, to_w, to_h)
        if to_w < 1 or to_h < 1 or to_w * to_h > max_pixels:
            raise ValueError(
                f"size {to_w}x{to_h} is more than this server allows (--max-pixels {max_pixels})"
            )
        out = resize_image(image, to_w, to_h, body.upscaler_1 or "None")
        if body.upscaler_2 not in (None, "None") and body.extras_upscaler_2_visibility > 0:
            other = resize_image(image, to_w, to_h, body.upscaler_2)
            out = PIL.Image.blend(out, other, body.extras_upscaler_2_visibility)
    except ValueError as e:
        raise ServeError(422, " ".join(str(e).split())) from None
    buffer = io.BytesIO()
    out.save(buffer, format="PNG")
    return {"html_info": "", "image": base64.b64encode(buffer.getvalue()).decode("ascii")}


def router(state: State) -> APIRouter:
    api = APIRouter(prefix="/sdapi/v1", tags=["A1111"])

    @api.get("/upscalers")
    async def upscalers():  # A1111's shape; pixel resizers only (no ESRGAN-family weights are shipped)
        return [
            {
                "name": name,
                "model_name": None,
                "model_path": None,
                "model_url": None,
                "scale": 4 if name != "None" else 1,
            }
            for name in PIXEL_FILTERS
        ]

    @api.get("/latent-upscale-modes")
    async def latent_upscale_modes():
        return [{"name": name} for name in LATENT_MODES]

    @api.post("/extra-single-image")
    async def extra_single_image(body: ExtrasSingleImageRequest):
        return extras(body, state.config.max_pixels)

    return api
