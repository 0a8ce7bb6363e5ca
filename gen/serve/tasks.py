"""A client's request as a Task: one set of options and its (prompt, seed) jobs, built and checked here for every
API, so A1111, OpenAI and native clients get the same limits, defaults and one-line errors."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import replace

from gen import generation as G
from gen.generation.inputs import ControlPictures, InitImages, init_images
from gen.serve.config import ServeConfig
from gen.serve.models import Models, ServedModel
from gen.serve.results import Result, decode_image

PER_IMAGE = ("prompt", "seed", "num_images", "batch_size")  # every other option must match to share a batch
FINAL = ("done", "cancelled", "interrupted", "failed")


class ServeError(Exception):
    """A request the server answers with an error: HTTP status, one line, and a short kind for the JSON body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


class Task:
    """One request in the queue. Its jobs may be rendered over several batches, beside other requests' jobs."""

    def __init__(
        self,
        model: ServedModel,
        options: G.Options,
        jobs: list[G.Job],
        init: InitImages | None = None,
        control: ControlPictures | None = None,
    ):
        self.id = uuid.uuid4().hex
        self.model, self.options, self.jobs, self.init = model, options, jobs, init
        self.control = control  # the ControlNet units' pictures (options.control names them by hash)
        self.key = model.title + json.dumps(
            {k: v for k, v in options.to_dict().items() if k not in PER_IMAGE}, sort_keys=True, default=str
        )
        self.results: list[Result | None] = [None] * len(jobs)
        self.pending = deque(range(len(jobs)))  # jobs not yet handed to the worker
        self.status = "queued"
        self.error: ServeError | None = None
        self.step, self.steps = 0, G.steps_run(options)
        self.created, self.started, self.finished = time.time(), None, None
        self._changed = asyncio.Event()
        # Called on every change before anyone is woken (gen.serve.state stores native jobs from it)
        self.listener: Callable[[Task], None] | None = None

    @property
    def done(self) -> bool:
        return self.status in FINAL

    def images(self) -> list[Result]:
        return [r for r in self.results if r is not None]

    def notify(self) -> None:
        """Wake everyone waiting on this task (event-loop thread only)."""
        if self.listener is not None:
            self.listener(self)
        self._changed.set()
        self._changed = asyncio.Event()

    def finish(self, status: str, error: ServeError | None = None) -> None:
        self.status, self.error, self.finished = status, error, time.time()
        self.pending.clear()
        self.notify()

    async def changed(self, timeout: float | None = None) -> bool:
        """Wait for the next change (True) or `timeout` seconds (False)."""
        event = self._changed
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True


def read_uploads(
    values: dict, image: str, mask: str | None = None, max_pixels: int | None = None
) -> InitImages:
    """Image-to-image (and, with a mask, inpainting) from uploads sent as raw base64 or data: URLs, checked
    (decodable pictures, mask and image of one size) before the request queues; ServeError(422) otherwise.

    `values` (the request's fields by gen's names) get the uploads' names, by their pixels' hash: requests with
    the same picture and settings share a batch, and `gen reproduce --init-image FILE` checks the hash, whatever
    the file is called. The mask's settings count only with a mask, the strength only with an init image."""
    for name in ("mask_blur", "invert_mask") if mask is None else ():
        values.pop(name, None)
    blur, invert = values.get("mask_blur", G.Options.mask_blur), values.get("invert_mask", False)
    try:
        decoded = decode_image(image, max_pixels, "init image")
        init = init_images(
            decoded,
            decode_image(mask, max_pixels, "mask") if mask else None,
            mask_blur=blur,
            invert_mask=invert,
        )
    except ValueError as e:
        raise ServeError(422, " ".join(str(e).split())) from None
    values["init_image"] = f"upload-{init.image_hash[:12]}.png"
    if init.mask is not None:
        values["mask"] = f"upload-{init.mask_hash[:12]}.png"
    return init


def build_task(
    config: ServeConfig,
    models: Models,
    values: dict,
    init: InitImages | None = None,
    control: ControlPictures | None = None,
) -> Task:
    """The request (its fields by gen's names, as each API's table maps them) checked against the server's
    limits and the model, before it queues; ServeError(422) otherwise. Fields left out take the request's
    defaults; the server's device, precision and attention, and its --max-steps on the default steps."""
    if values.get("seed") == -1:  # A1111's "random", which every API accepts
        values = {k: v for k, v in values.items() if k != "seed"}
    try:
        model = models.find(values.get("model"))
        o = G.Options(**{**server_values(config), **values, "model": model.path, **model.parts})
        if init is None:
            o.strength, o.mask_blur, o.invert_mask = G.Options.strength, G.Options.mask_blur, False
        G.check_options(o)  # first: the sizes below are computed from these values
        o.height, o.width = G.size_of(model.pipe, o, init)
        check_limits(config, o, *G.final_size(model.pipe, o, init))
        G.validate(model.pipe, replace(o, batch_size=min(o.num_images, config.max_batch)), init)
    except ValueError as e:
        raise ServeError(422, " ".join(str(e).split())) from None
    if o.seed is None:
        o.seed = G.pick_seed()
    return Task(model, o, list(G.plan([o.prompt], o.num_images, o.seed)), init, control)


def server_values(config: ServeConfig) -> dict:
    """What the server decides, not the client: where and how it computes, and the steps of a request that
    names none (gen's default clamped to --max-steps: a server started with --max-steps 8 must not run 20)."""
    return {
        "device": config.device,
        "dtype": config.dtype,
        "attention": config.attention,
        "backend": config.backend,
        "steps": min(G.Options.steps, config.max_steps),
    }


def check_limits(config: ServeConfig, o: G.Options, height: int, width: int) -> None:
    """The server's limits on one request: prompt lengths, images, steps and the pixels of its images (height x
    width: hires fix's upscaled size where it is on)."""
    limits = (
        (len(o.prompt), config.max_prompt, "prompt length", "characters"),
        (len(o.negative), config.max_prompt, "negative prompt length", "characters"),
        (o.num_images, config.max_images, "images in one request", "--max-images"),
        (o.steps, config.max_steps, "steps", "--max-steps"),
        (o.hires_steps, config.max_steps, "hires steps", "--max-steps"),
        (
            width * height,
            config.max_pixels,
            f"size {width}x{height} is {width * height} pixels;",
            "--max-pixels",
        ),
    )
    for value, limit, what, unit in limits:
        if isinstance(value, int) and value > limit:
            shown = "" if what.endswith(";") else f" {value}"
            raise ValueError(f"{what}{shown} is more than this server allows ({unit} {limit})")


def request_defaults(config: ServeConfig) -> dict:
    """What a request that leaves a field out gets, by the jobs API's names (the web page shows these)."""
    o = G.Options(**server_values(config))
    names = ("steps", "guidance", "strength", "mask_blur", "hires_upscaler", "hires_steps", "hires_strength")
    return {name: getattr(o, name) for name in names}


def request_values(body, names: dict[str, str]) -> dict:
    """An API's request body in gen's terms, through that API's name table (its field -> the request's field):
    the fields the client gave, None meaning "not given"."""
    return {
        ours: getattr(body, theirs) for theirs, ours in names.items() if getattr(body, theirs) is not None
    }
