"""A client's request as a Task: one set of options and its (prompt, seed) jobs, built and checked here for every
API, so A1111, OpenAI and native clients get the same limits, defaults and one-line errors."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

from gen import generation as G
from gen.generation.inputs import InitImages
from gen.serve.config import ServeConfig
from gen.serve.models import Models, ServedModel
from gen.serve.results import Result

PER_IMAGE = ("prompt", "seed", "num_images", "batch_size")  # every other option must match to share a batch
FINAL = ("done", "cancelled", "interrupted", "failed")


class ServeError(Exception):
    """A request the server answers with an error: HTTP status, one line, and a short kind for the JSON body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


@dataclass
class Request:
    """What every API asks for, in gen's terms (None: the default)."""

    prompt: str
    negative: str = ""
    n: int = 1
    seed: int | None = None  # None or -1: random
    steps: int | None = None
    sampler: str | None = None  # gen's name; None: the model's own scheduler
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    model: str | None = None  # title, name or hash; None: the default model
    init: InitImages | None = None  # image-to-image (with a mask: inpainting)
    strength: float = 0.75
    mask_blur: int = 4  # recorded; the blur itself is applied when `init` is made
    invert: bool = False
    clip_skip: int | None = None  # A1111's numbering (gen.generation.clip_skip)
    sdxl_clip_l_skip: bool = False


class Task:
    """One request in the queue. Its jobs may be rendered over several batches, beside other requests' jobs."""

    def __init__(
        self, model: ServedModel, options: G.Options, jobs: list[G.Job], init: InitImages | None = None
    ):
        self.id = uuid.uuid4().hex
        self.model, self.options, self.jobs, self.init = model, options, jobs, init
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


def add_init(
    r: Request,
    image: str,
    mask: str | None = None,
    strength: float = 0.75,
    blur: int = 4,
    invert: bool = False,
    max_pixels: int | None = None,
) -> Request:
    """Image-to-image (and, with a mask, inpainting) from uploads sent as raw base64 or data: URLs, checked
    (decodable pictures, mask and image of one size) before the request queues; ServeError(422) otherwise."""
    from gen.generation.inputs import init_images
    from gen.serve.results import decode_image

    try:
        decoded = decode_image(image, max_pixels, "init image")
        r.init = init_images(
            decoded,
            decode_image(mask, max_pixels, "mask") if mask else None,
            mask_blur=blur,
            invert_mask=invert,
        )
    except ValueError as e:
        raise ServeError(422, " ".join(str(e).split())) from None
    r.strength, r.mask_blur, r.invert = strength, blur, invert
    return r


def build_task(config: ServeConfig, models: Models, r: Request) -> Task:
    """Check a request against the server's limits and the model, before it queues; ServeError(422) otherwise."""
    try:
        model = models.find(r.model)
        o = _options(config, model, r)
        G.check_options(o)
        G.validate(model.pipe, replace(o, batch_size=min(o.num_images, config.max_batch)), r.init)
    except ValueError as e:
        raise ServeError(422, " ".join(str(e).split())) from None
    if o.seed is None:
        o.seed = G.pick_seed()
    return Task(model, o, list(G.plan([o.prompt], o.num_images, o.seed)), r.init)


def _options(config: ServeConfig, model: ServedModel, r: Request) -> G.Options:
    size = model.default_size
    if r.init is not None:  # the init image's size unless given, as on the command line
        height, width = G.size_of(model.pipe, G.Options(width=r.width, height=r.height), r.init)
    else:
        width = size if r.width is None else r.width
        height = size if r.height is None else r.height
    limits = (
        (len(r.prompt), config.max_prompt, "prompt length", "characters"),
        (len(r.negative), config.max_prompt, "negative prompt length", "characters"),
        (r.n, config.max_images, "images in one request", "--max-images"),
        (r.steps or 0, config.max_steps, "steps", "--max-steps"),
        (
            width * height,
            config.max_pixels,
            f"size {width}x{height} is {width * height} pixels;",
            "--max-pixels",
        ),
    )
    for value, limit, what, unit in limits:
        if value > limit:
            shown = "" if what.endswith(";") else f" {value}"
            raise ValueError(f"{what}{shown} is more than this server allows ({unit} {limit})")
    if r.n < 1:
        raise ValueError(f"images in one request {r.n} must be >= 1")
    seed = None if r.seed is None or r.seed == -1 else r.seed
    return G.Options(
        prompt=r.prompt,
        negative=r.negative,
        model=model.path,
        num_images=r.n,
        seed=seed,
        steps=default_steps(config) if r.steps is None else r.steps,
        sampler=r.sampler,
        guidance=G.Options.guidance if r.guidance is None else r.guidance,
        width=width,
        height=height,
        device=config.device,
        dtype=config.dtype,
        attention=config.attention,
        clip_skip=r.clip_skip,
        sdxl_clip_l_skip=r.sdxl_clip_l_skip,
        **_init_options(r),
    )


def default_steps(config: ServeConfig) -> int:
    """Steps for a request that names none: gen's default, clamped to --max-steps (a server started with
    --max-steps 8 must not run 20 for a request that left steps out)."""
    return min(G.Options.steps, config.max_steps)


def request_defaults(config: ServeConfig) -> dict:
    """What a request that leaves a field out gets (the web page shows these)."""
    return {"steps": default_steps(config), "guidance": G.Options.guidance}


def _init_options(r: Request) -> dict:
    """An upload's options: named by its pixels' hash (requests with the same picture and settings share a batch;
    `gen reproduce --init-image FILE` checks the hash, whatever the file is called)."""
    if r.init is None:
        return {}
    named = {"init_image": f"upload-{r.init.image_hash[:12]}.png", "strength": r.strength}
    if r.init.mask is not None:
        named |= {
            "mask": f"upload-{r.init.mask_hash[:12]}.png",
            "mask_blur": r.mask_blur,
            "invert_mask": r.invert,
        }
    return named
