"""What a running server holds: its config, models, queue, A1111 options and native jobs. Routers get it from
create_app; nothing here is shared between replicas (see README, "Server": scale-out)."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from fastapi import Request as HttpRequest

from gen.serve.config import ServeConfig
from gen.serve.models import Models
from gen.serve.queue import Queue
from gen.serve.tasks import Task

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5  # how often a waiting request checks that its client is still there


class State:
    def __init__(self, config: ServeConfig, models: Models):
        self.config, self.models = config, models
        self.queue: Queue | None = None
        # A1111's /options: the checkpoint and the Clip skip settings are honoured, any other key kept and echoed
        self.options = {
            "sd_model_checkpoint": models.default.title,
            "sd_checkpoint_hash": models.default.sha256,
            "samples_format": "png",
            "CLIP_stop_at_last_layers": 1,  # A1111's Clip skip, honoured (gen.generation.clip_skip)
            "sdxl_clip_l_skip": False,
            "sd_vae": "Automatic",
        }
        self.jobs: OrderedDict[str, Task] = OrderedDict()  # native jobs, newest last
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: asyncio.Task | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.queue = Queue(self.config.max_batch, self.config.max_queue, self.config.batch_wait_ms / 1000)
        self._worker = asyncio.create_task(self.queue.run(), name="gen-queue")

    async def stop(self) -> None:
        if self.queue is not None:
            self.queue.close()
            await self._worker

    def close_threadsafe(self) -> None:
        """From a signal handler or another thread: stop accepting, answer queued requests 503."""
        if self._loop is not None and self.queue is not None:
            self._loop.call_soon_threadsafe(self.queue.close)

    async def run(self, task: Task, http: HttpRequest) -> Task:
        """Queue a task and wait for it; a client that hangs up takes its task out of the queue."""
        self.queue.submit(task)
        while not task.done:
            await task.changed(DISCONNECT_POLL_S)
            if not task.done and await http.is_disconnected():
                logger.info("client gone: dropping task %s", task.id)
                self.queue.cancel(task)
        return task

    def keep(self, task: Task) -> None:
        """Remember a native job; forget the oldest finished ones beyond keep_jobs jobs or keep_bytes of PNGs."""
        self.jobs[task.id] = task
        held = sum(len(r.png) for t in self.jobs.values() for r in t.images())
        for key, old in list(self.jobs.items()):
            if len(self.jobs) <= self.config.keep_jobs and held <= self.config.keep_bytes:
                break
            if old.done:
                held -= sum(len(r.png) for r in old.images())
                del self.jobs[key]
