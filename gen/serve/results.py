"""Images in and out of the APIs: PNG bytes carrying exactly the CLI's metadata (so `gen reproduce served.png
--verify` passes), base64, and A1111's "parameters" text read back."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image

from gen.generation import metadata


@dataclass(frozen=True)
class Result:
    index: int  # k of seed + k within its request
    seed: int
    prompt: str
    png: bytes
    parameters: str  # A1111's infotext, also in the PNG
    sampler: str  # A1111's label of the sampler that made it

    def b64(self) -> str:
        return base64.b64encode(self.png).decode("ascii")


def encode(pipe, o, job, image, model_hash: str, init=None, control=None) -> Result:
    record = metadata.record(pipe, o, job, image, model_hash, init, control)
    buffer = io.BytesIO()
    parameters = metadata.a1111_parameters(record)
    image.save(buffer, format="PNG", pnginfo=metadata.png_info(record, parameters))
    return Result(job.index, job.seed, job.prompt, buffer.getvalue(), parameters, record["sampler_label"])


def encode_png(image: Image.Image) -> str:
    """A picture as base64 PNG (no metadata): the preprocessors' and upscalers' answers."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(text: str, max_pixels: int | None = None, what: str = "image") -> Image.Image:
    """An image sent as raw base64 or a data: URL (A1111 clients send both); ValueError if it is neither, or if
    its header says it has more than `max_pixels` pixels: checked before decoding, since a 65 KB PNG can hold
    a 20000x20000 picture that would take gigabytes to decode. (Not by setting PIL's global MAX_IMAGE_PIXELS:
    this check names the size and the server's limit, and leaves PIL's guard for everything else.)"""
    data = text.strip()
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{what} is not a base64-encoded picture or data: URL ({e})") from None
    too_large = f"more than this server allows (--max-pixels {max_pixels})"
    try:
        with warnings.catch_warnings():  # PIL warns of large images; the size is checked here instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))  # reads the header only
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise ValueError(f"{what} is {width}x{height} = {width * height} pixels, {too_large}")
        image.load()
    except Image.DecompressionBombError as e:  # PIL's own guard, at twice Image.MAX_IMAGE_PIXELS
        raise ValueError(f"{what} has {too_large}: {e}") from None
    except OSError as e:
        raise ValueError(f"{what} is not a base64-encoded picture or data: URL ({e})") from None
    return image


# A1111's own pattern for "Key: value" pairs (modules/infotext_utils.py): values may be quoted JSON strings.
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict:
    """A1111's infotext as the dict its png-info endpoint returns: Prompt, Negative prompt, each Key (strings),
    Size split into Size-1 and Size-2."""
    lines = text.strip().split("\n")
    pairs = _PAIR.findall(lines[-1]) if lines else []
    if len(pairs) < 3:  # as A1111: fewer than three pairs means the last line is still prompt
        pairs = []
    else:
        lines = lines[:-1]
    prompt, negative, into_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            into_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if into_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in pairs:
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        if key == "Size" and re.fullmatch(r"\d+x\d+", value):
            out["Size-1"], out["Size-2"] = value.split("x")
        else:
            out[key] = value
    return out
