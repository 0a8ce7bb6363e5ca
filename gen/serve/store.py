"""Where native jobs (POST /gen/v1/jobs) are kept: in memory, or in a folder that survives a crash.

A store holds JobRecords: what it takes to render a job again (its options, model, (prompt, seed) jobs and
init pictures) and how far it got (status, times, error, the finished images). Two stores with one interface:

    MemoryStore    the server's memory only (`gen serve --state-dir none`): a restart forgets every job
    SqliteStore    DIR/jobs.sqlite3 (WAL, one transaction per change) and DIR/images/{id}/{k}.png, each PNG
                   written atomically before its row says it exists, so a kill -9 at any moment leaves every
                   accepted job and no half image; one server per folder (DIR/lock)

A store shared by several replicas (a PostgreSQL job table, workers claiming rows with SELECT ... FOR UPDATE
SKIP LOCKED, PNGs in object storage) would be a third class with these methods; see README, "Server".
The records and the interface are gen.serve.records; the SQLite store is gen.serve.sqlite_store.

All calls come from the server's event loop, one at a time.
"""

from __future__ import annotations

import io
from collections import deque
from dataclasses import replace

from PIL import Image

from gen import generation as G
from gen.generation.inputs import InitImages, control_pictures
from gen.serve.config import ServeConfig
from gen.serve.models import ServedModel
from gen.serve.records import JobRecord, JobStore, StoredImage, StoredInit
from gen.serve.results import Result
from gen.serve.sqlite_store import SCHEMA, SqliteStore
from gen.serve.tasks import FINAL, ServeError, Task

# The records and the SQLite store live in their own modules; their names are this module's too.
__all__ = [
    "SCHEMA",
    "JobRecord",
    "JobStore",
    "MemoryStore",
    "SqliteStore",
    "StoredImage",
    "StoredInit",
    "open_store",
    "record_of",
    "restore",
    "stored_image",
]


class MemoryStore(JobStore):
    def __init__(self):
        self._jobs: dict[str, JobRecord] = {}  # in acceptance order

    def add(self, record: JobRecord) -> None:
        self._jobs[record.id] = _copy(record)

    def add_image(self, job_id: str, image: StoredImage) -> None:
        if job_id in self._jobs:
            self._jobs[job_id].images[image.index] = image

    def set_status(self, job_id: str, status: str, finished: float | None, error: str | None) -> None:
        if job_id in self._jobs:
            self._jobs[job_id] = replace(self._jobs[job_id], status=status, finished=finished, error=error)

    def get(self, job_id: str) -> JobRecord | None:
        record = self._jobs.get(job_id)
        return None if record is None else _copy(record)

    def unfinished(self) -> list[JobRecord]:
        return [_copy(r) for r in self._jobs.values() if r.status not in FINAL]

    def delete(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)

    def expire(self, before: float) -> list[str]:
        old = [k for k, r in self._jobs.items() if r.finished is not None and r.finished < before]
        for key in old:
            del self._jobs[key]
        return old


def _copy(record: JobRecord) -> JobRecord:
    return replace(record, images=dict(record.images), jobs=list(record.jobs))


def open_store(config: ServeConfig) -> JobStore:
    return MemoryStore() if config.state_dir is None else SqliteStore(config.state_dir)


# --- Tasks as records, and back ---


def record_of(task: Task, pictures: bool = True) -> JobRecord:
    """`pictures` False leaves the init pictures out: a store that ends with the process never renders a job
    again, and encoding them would only delay the answer."""
    return JobRecord(
        id=task.id,
        model_name=task.model.name,
        model_sha256=task.model.sha256,
        options=task.options.to_dict(),
        jobs=[(j.index, j.prompt, j.seed) for j in task.jobs],
        init=None if task.init is None or not pictures else _stored_init(task.init),
        status=task.status,
        created=task.created,
        finished=task.finished,
        error=task.error.message if task.error else None,
        control=None if task.control is None or not pictures else [_png(p) for p in task.control.pictures],
    )


def stored_image(result: Result) -> StoredImage:
    return StoredImage(result.index, result.parameters, result.sampler, result.png)


def restore(record: JobRecord, model: ServedModel, config: ServeConfig) -> Task:
    """The Task again: finished images in place, only the others pending. The device, precision and model path
    are this server's (the weights are the same: `model` was found by their hash)."""
    o = G.Options.from_dict(record.options)
    o.model, o.device, o.dtype, o.attention = model.path, config.device, config.dtype, config.attention
    o.base, o.text_encoder, o.vae = None, [], None
    for name, value in model.parts.items():
        setattr(o, name, value)
    o.backend = config.backend
    jobs = [G.Job(index, prompt, seed) for index, prompt, seed in record.jobs]
    init = None if record.init is None else _init_images(record.init)
    control = None if not record.control else control_pictures([_decode(png) for png in record.control])
    task = Task(model, o, jobs, init, control)
    task.id, task.created = record.id, record.created
    for index, image in record.images.items():
        job = jobs[index]
        task.results[index] = Result(index, job.seed, job.prompt, image.png, image.parameters, image.sampler)
    task.pending = deque(k for k in range(len(jobs)) if task.results[k] is None)
    if record.status in FINAL:
        task.status, task.finished = record.status, record.finished
        task.error = None if record.error is None else ServeError(500, record.error, "internal")
        task.pending.clear()
        if record.status == "done":  # where a stopped job's progress was is not stored
            task.step = task.steps
    return task


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # lossless; fast, as it runs before the 202
    return buffer.getvalue()


def _stored_init(init: InitImages) -> StoredInit:
    mask = None if init.mask is None else _png(init.mask)
    return StoredInit(_png(init.image), init.image_hash, mask, init.mask_hash)


def _decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.copy()


def _init_images(stored: StoredInit) -> InitImages:
    mask = None if stored.mask is None else _decode(stored.mask)
    return InitImages(_decode(stored.image), stored.image_hash, mask, stored.mask_hash)
