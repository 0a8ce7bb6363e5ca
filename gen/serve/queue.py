"""The queue and its one worker (one per device): compatible requests share one pipeline call.

Requests whose options match in everything but prompt and seed (model, size, steps, sampler, guidance, negative
prompt, ...) are batched, up to --max-batch images, oldest first. Batching never changes a picture: the generation
core gives each image its own generator (seed + k) and the models are batch-invariant, so every image equals the
CLI's for the same prompt, seed and settings.

All bookkeeping runs on the event loop; only the pipeline call and PNG encoding run on the worker thread, which
reports steps back with call_soon_threadsafe and stops a batch by raising from the step callback.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from gen import generation as G
from gen.generation.inputs import ControlPictures, InitImages
from gen.serve import results
from gen.serve.models import ServedModel
from gen.serve.tasks import ServeError, Task

logger = logging.getLogger(__name__)


class Interrupted(Exception):
    """Raised in the step callback when nobody wants the running batch any more."""


def render_batch(
    model: ServedModel,
    o: G.Options,
    jobs: list[G.Job],
    on_step,
    init: InitImages | None = None,
    control: ControlPictures | None = None,
) -> list[results.Result]:
    """On the worker thread: the generation core's render (from `init` for img2img and inpainting, steered by
    the ControlNet units' pictures in `control`), then PNGs with the CLI's metadata."""
    pipe = model.pipeline(o.sampler, init)
    images = G.render(pipe, o, jobs, on_step=on_step, init=init, control=control)
    return [
        results.encode(pipe, o, job, image, model.sha256, init, control)
        for job, image in zip(jobs, images, strict=True)
    ]


class Queue:
    def __init__(self, max_batch: int, max_queue: int, batch_wait: float = 0.0):
        self.max_batch, self.max_queue, self.batch_wait = max_batch, max_queue, batch_wait
        self.waiting: deque[Task] = deque()  # tasks with jobs not yet started, oldest first
        self.running: list[tuple[Task, int]] = []  # (task, job index) in the batch being rendered
        self.closed = False
        self.interrupted = False  # A1111's state.interrupted: the last batch was stopped by /interrupt
        self.step, self.steps, self.batch_started = 0, 0, 0.0
        self.stats = {"batches": 0, "images": 0, "largest_batch": 0}
        self.seconds_per_image = 1.0
        self._last_batch_end = -math.inf
        self._abort = False  # read by the worker thread between steps
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gen-worker")

    # --- what the APIs call (event loop) ---

    def submit(self, task: Task) -> int:
        """Queue a task and return its position; 503 when shutting down, 429 when full."""
        if self.closed:
            raise ServeError(503, "the server is shutting down", "unavailable")
        if len(self.waiting) >= self.max_queue:
            raise ServeError(
                429,
                f"the queue is full ({len(self.waiting)} requests waiting); retry later",
                "queue_full",
                {"Retry-After": str(self.retry_after())},
            )
        self.waiting.append(task)
        self._wake.set()
        return self.position(task)

    def position(self, task: Task) -> int:
        """0: running or next; k: k requests ahead of it."""
        if task.done or task.started is not None:
            return 0
        return self.waiting.index(task) if task in self.waiting else 0

    def running_tasks(self) -> list[Task]:
        return list(dict.fromkeys(task for task, _ in self.running))

    def queued_tasks(self) -> list[Task]:
        return [t for t in self.waiting if t.started is None]

    def retry_after(self) -> int:
        images = sum(len(t.pending) for t in self.waiting) + len(self.running)
        return max(1, math.ceil(images * self.seconds_per_image))

    def cancel(self, task: Task, status: str = "cancelled") -> None:
        """Drop a task: its queued jobs go, and the running batch stops if no one else is in it."""
        if task.done:
            return
        if task in self.waiting:
            self.waiting.remove(task)
        task.finish(status)
        if self.running and all(t.done for t, _ in self.running):
            self._abort = True

    def interrupt(self) -> None:
        """A1111's /interrupt: stop what is running; those requests answer with the images already made."""
        for task in self.running_tasks():
            self.cancel(task, "interrupted")
        self.interrupted = bool(self.running)

    def close(self) -> None:
        """Stop accepting; queued requests are answered 503; the running batch finishes."""
        self.closed = True
        for task in list(self.waiting):
            self.waiting.remove(task)
            task.finish("failed", ServeError(503, "the server is shutting down", "unavailable"))
        self._wake.set()

    # --- the worker (one task on the event loop, rendering on one thread) ---

    async def run(self) -> None:
        try:
            while True:
                await self._gather()
                batch = self._take()
                if batch:
                    await self._render(batch)
                elif self.closed:
                    return
                else:
                    self._wake.clear()
                    await self._wake.wait()
        finally:
            self._executor.shutdown(wait=False)

    async def _gather(self) -> None:
        """Right after a batch, wait up to batch_wait for compatible requests to fill the next one: clients that
        just got their images send their next request a moment later, and without this pause the worker would
        start on the one request that waited, alone. An idle server starts at once."""
        deadline = self._last_batch_end + self.batch_wait
        while self.waiting and not self.closed and self._compatible() < self.max_batch:
            left = deadline - self._loop.time()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                return

    def _compatible(self) -> int:
        key = self.waiting[0].key
        return sum(len(t.pending) for t in self.waiting if t.key == key)

    def _take(self) -> list[tuple[Task, int]]:
        """The oldest request's jobs, then those of every later request with the same options, up to max_batch."""
        if not self.waiting:
            return []
        key, batch = self.waiting[0].key, []
        for task in list(self.waiting):
            if task.key != key:
                continue
            while task.pending and len(batch) < self.max_batch:
                batch.append((task, task.pending.popleft()))
            if not task.pending:
                self.waiting.remove(task)
            if len(batch) == self.max_batch:
                break
        for task in self.waiting:  # their positions moved up
            task.notify()
        return batch

    async def _render(self, batch: list[tuple[Task, int]]) -> None:
        """Render a batch; if it fails and holds several requests, render each request on its own, so one
        request's failure (a prompt or setting that breaks the pipeline) is answered to that request alone."""
        try:
            await self._render_once(batch)
        except Interrupted:
            pass
        except Exception as e:
            groups = _by_task(batch)
            if len(groups) == 1:
                self._fail(groups[0][0][0], e)
                return
            logger.warning("a batch of %d requests failed (%s); rendering each alone", len(groups), e)
            for group in groups:
                if group[0][0].done:  # cancelled meanwhile
                    continue
                try:
                    await self._render_once(group)
                except Interrupted:
                    pass
                except Exception as alone:
                    self._fail(group[0][0], alone)

    async def _render_once(self, batch: list[tuple[Task, int]]) -> None:
        first = batch[0][0]
        steps = G.steps_run(first.options)  # fewer than options.steps from an init image
        self.running, self._abort, self.interrupted = batch, False, False
        self.step, self.steps, self.batch_started = 0, steps, time.time()
        for task in self.running_tasks():
            task.started = task.started or time.time()
            task.status = "running"
            task.step, task.steps = 0, steps
            task.notify()
        jobs = [task.jobs[i] for task, i in batch]
        start = time.monotonic()
        try:
            made = await self._loop.run_in_executor(
                self._executor,
                render_batch,
                first.model,
                first.options,
                jobs,
                self._on_step,
                first.init,
                first.control,
            )
        finally:
            self.running = []
            self._last_batch_end = self._loop.time()
        self._account(len(batch), time.monotonic() - start)
        self._deliver(batch, made)

    def _fail(self, task: Task, e: Exception) -> None:
        """Answer a request whose render failed: its settings' fault (ValueError: a guidance scale that
        overflows the latents, ...) is a 422 naming it; anything else a 500, logged. The server keeps serving."""
        if isinstance(e, ValueError):
            logger.warning("request %s failed on its settings: %s", task.id, e)  # the operator sees it too
            error = ServeError(422, " ".join(str(e).split()))
        else:
            logger.error("generation failed", exc_info=e)
            error = ServeError(500, f"generation failed: {' '.join(str(e).split())}", "internal")
        if task in self.waiting:
            self.waiting.remove(task)
        if not task.done:
            task.finish("failed", error)

    def _account(self, size: int, seconds: float) -> None:
        self.stats["batches"] += 1
        self.stats["images"] += size
        self.stats["largest_batch"] = max(self.stats["largest_batch"], size)
        self.seconds_per_image = 0.7 * self.seconds_per_image + 0.3 * seconds / size

    def _deliver(self, batch: list[tuple[Task, int]], made: list[results.Result]) -> None:
        for (task, i), result in zip(batch, made, strict=True):
            if not task.done:
                task.results[i] = result
        for task in dict.fromkeys(task for task, _ in batch):
            if task.done:
                continue
            if all(r is not None for r in task.results):
                task.finish("done")
            else:
                task.notify()

    def _on_step(self) -> None:
        """Worker thread, once per denoising step."""
        if self._abort:
            raise Interrupted
        self._loop.call_soon_threadsafe(self._stepped)

    def _stepped(self) -> None:
        self.step += 1
        for task in self.running_tasks():
            task.step = min(self.step, task.steps)
            task.notify()


def _by_task(batch: list[tuple[Task, int]]) -> list[list[tuple[Task, int]]]:
    """The batch's entries grouped by request, in the batch's order."""
    groups: dict[Task, list[tuple[Task, int]]] = {}
    for task, i in batch:
        groups.setdefault(task, []).append((task, i))
    return list(groups.values())
