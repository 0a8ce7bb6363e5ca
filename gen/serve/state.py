"""What a running server holds: its config, models, queue, A1111 options and native jobs (in memory, bounded,
in front of their store: gen.serve.store). Routers get it from create_app; nothing here is shared between
replicas (see README, "Server": scale-out)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from fastapi import Request as HttpRequest

from gen.serve import store as S
from gen.serve.config import ServeConfig
from gen.serve.models import Models, ServedModel, find_controlnets
from gen.serve.queue import Queue
from gen.serve.tasks import ServeError, Task

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5  # how often a waiting request checks that its client is still there
EXPIRE_EVERY_S = 60.0  # how often accepting a job also forgets those finished more than --keep-jobs hours ago


@dataclass
class Saved:
    """What the store already holds of a job (its listener writes only what changed)."""

    status: str
    images: set[int] = field(default_factory=set)


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
        # sd-webui-controlnet's model_list: "name [hash]" -> path, from --controlnet-dir (re-read on ?update)
        self.controlnets = find_controlnets(config.controlnet_dir)
        self.jobs: OrderedDict[str, Task] = OrderedDict()  # native jobs in memory, newest last
        self.store = S.open_store(config)  # here, not in start(): a folder in use fails before uvicorn starts
        self._expired = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: asyncio.Task | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.queue = Queue(self.config.max_batch, self.config.max_queue, self.config.batch_wait_ms / 1000)
        self._resume()
        self._worker = asyncio.create_task(self.queue.run(), name="gen-queue")

    async def stop(self) -> None:
        if self.queue is not None:
            self._close()
            await self._worker
        self.store.close()

    def close_threadsafe(self) -> None:
        """From a signal handler or another thread: stop accepting, answer queued requests 503 (stored native
        jobs stay queued in the store)."""
        if self._loop is not None and self.queue is not None:
            self._loop.call_soon_threadsafe(self._close)

    def _close(self) -> None:
        """Stop the queue. Stored jobs still waiting stay queued in the store, to run when the server starts
        again; their clients hear the server is going (their streams must end for uvicorn to stop)."""
        if self.store.durable and not self.queue.closed:
            going = ServeError(
                503,
                "the server is shutting down; the job is stored and runs when it starts again",
                "unavailable",
            )
            for task in [t for t in self.queue.waiting if t.listener is not None]:
                task.listener = None  # what the store holds stays as it is
                self.queue.waiting.remove(task)
                task.finish("failed", going)
        self.queue.close()

    def _resume(self) -> None:
        """Queue again, in their original order, the stored jobs the last server did not finish (queued, or
        running when it stopped), with only their unfinished images pending."""
        self._expire()
        for record in self.store.unfinished():
            try:
                model = self.models.find(record.model_sha256)
            except ValueError:
                error = (
                    f"model {record.model_title} is no longer served here (the server restarted without it)"
                )
                self.store.set_status(record.id, "failed", time.time(), error)
                logger.warning("job %s failed: %s", record.id, error)
                continue
            task = S.restore(record, model, self.config)
            task.listener = self._listener(Saved(record.status, set(record.images)))
            if task.pending:
                # Appended, not submitted: admitted before the restart; --max-queue is for new ones.
                self.queue.waiting.append(task)
            else:  # every image was stored before the crash, the status not yet
                task.finish("done")
            self._remember(task)
        if self.queue.waiting:
            logger.info("resumed %d stored jobs", len(self.queue.waiting))

    async def run(self, task: Task, http: HttpRequest) -> Task:
        """Queue a task and wait for it; a client that hangs up takes its task out of the queue."""
        self.queue.submit(task)
        while not task.done:
            await task.changed(DISCONNECT_POLL_S)
            if not task.done and await http.is_disconnected():
                logger.info("client gone: dropping task %s", task.id)
                self.queue.cancel(task)
        return task

    # --- native jobs ---

    def accept(self, task: Task) -> None:
        """Queue a native job, stored before anyone hears of it; ServeError 429/503 if the queue is full or
        closed, 503 if the job cannot be stored."""
        self.queue.submit(task)
        try:
            self.store.add(S.record_of(task, pictures=self.store.durable))
        except OSError as e:
            self.queue.cancel(task)
            logger.error("could not store job %s: %s", task.id, e)
            raise ServeError(
                503, f"the job could not be stored: {' '.join(str(e).split())}", "unavailable"
            ) from None
        task.listener = self._listener(Saved(task.status))
        self._remember(task)

    def job(self, job_id: str) -> Task | None:
        """A native job from memory, else from the store; None if unknown, deleted or expired."""
        task = self.jobs.get(job_id)
        if task is None:
            record = self.store.get(job_id)
            if record is None:
                return None
            task = S.restore(record, self._model_of(record), self.config)
            self._remember(task)
        if task.done and task.finished is not None and task.finished < self._cutoff():
            self.forget(task)
            return None
        return task

    def forget(self, task: Task) -> None:
        """DELETE: cancel the job if it is queued or running (its streams end with that), then forget it."""
        self.queue.cancel(task)
        task.listener = None
        self.jobs.pop(task.id, None)
        self.store.delete(task.id)

    def _model_of(self, record: S.JobRecord) -> ServedModel:
        """The served model with the job's weights; for a finished job's description only, a stand-in."""
        try:
            return self.models.find(record.model_sha256)
        except ValueError:
            return ServedModel(None, record.model_name, record.model_sha256, None, None)

    def _listener(self, saved: Saved):
        """Store each change of a job before anyone is woken: new images (files, then rows), then its
        status."""

        def listener(task: Task) -> None:
            try:
                for result in task.images():
                    if result.index not in saved.images:
                        self.store.add_image(task.id, S.stored_image(result))
                        saved.images.add(result.index)
                if task.status != saved.status:
                    error = task.error.message if task.error else None
                    self.store.set_status(task.id, task.status, task.finished, error)
                    saved.status = task.status
            except OSError:  # still served from memory; after a crash the image would be made again
                logger.exception("could not store a change of job %s", task.id)

        return listener

    def _remember(self, task: Task) -> None:
        """Hold a job in memory; drop the oldest finished ones beyond keep_jobs jobs or keep_bytes of PNGs (a
        store that outlives the process still has them)."""
        self.jobs[task.id] = task
        held = sum(len(r.png) for t in self.jobs.values() for r in t.images())
        for key, old in list(self.jobs.items()):
            if len(self.jobs) <= self.config.keep_jobs and held <= self.config.keep_bytes:
                break
            if old.done:
                held -= sum(len(r.png) for r in old.images())
                del self.jobs[key]
                if not self.store.durable:
                    self.store.delete(key)
        if time.monotonic() - self._expired > EXPIRE_EVERY_S:
            self._expire()

    def _cutoff(self) -> float:
        return time.time() - self.config.keep_hours * 3600

    def _expire(self) -> None:
        """Forget the jobs finished more than --keep-jobs hours ago."""
        self._expired = time.monotonic()
        for key in self.store.expire(self._cutoff()):
            self.jobs.pop(key, None)
