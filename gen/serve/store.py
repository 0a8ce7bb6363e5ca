"""Where native jobs (POST /gen/v1/jobs) are kept: in memory, or in a folder that survives a crash.

A store holds JobRecords: what it takes to render a job again (its options, model, (prompt, seed) jobs and
init pictures) and how far it got (status, times, error, the finished images). Two stores with one interface:

    MemoryStore    the server's memory only (`gen serve --state-dir none`): a restart forgets every job
    SqliteStore    DIR/jobs.sqlite3 (WAL, one transaction per change) and DIR/images/{id}/{k}.png, each PNG
                   written atomically before its row says it exists, so a kill -9 at any moment leaves every
                   accepted job and no half image; one server per folder (DIR/lock)

A store shared by several replicas (a PostgreSQL job table, workers claiming rows with SELECT ... FOR UPDATE
SKIP LOCKED, PNGs in object storage) would be a third class with these methods; see README, "Server".

All calls come from the server's event loop, one at a time.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import sqlite3
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from PIL import Image

from gen import generation as G
from gen.files import atomic_write
from gen.generation.inputs import InitImages
from gen.serve.config import ServeConfig
from gen.serve.models import ServedModel
from gen.serve.results import Result
from gen.serve.tasks import FINAL, ServeError, Task

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one server per folder is then the user's to keep
    fcntl = None

logger = logging.getLogger(__name__)

SCHEMA = 1  # PRAGMA user_version of jobs.sqlite3


@dataclass
class StoredImage:
    index: int  # k of seed + k
    parameters: str  # A1111's infotext (also in the PNG)
    sampler: str  # A1111's label of the sampler that made it
    png: bytes


@dataclass
class StoredInit:
    """An InitImages as lossless PNGs: the RGB picture and the mask as rendered (after inversion and blur),
    with the hashes of the uploads as given, so the re-made InitImages equals the original."""

    image: bytes
    image_hash: str
    mask: bytes | None = None
    mask_hash: str | None = None


@dataclass
class JobRecord:
    id: str
    model_name: str
    model_sha256: str
    options: dict  # gen.generation.Options.to_dict()
    jobs: list[tuple[int, str, int]]  # (index, prompt, seed)
    init: StoredInit | None = None
    status: str = "queued"
    created: float = 0.0
    finished: float | None = None
    error: str | None = None
    images: dict[int, StoredImage] = field(default_factory=dict)  # the finished ones, by index

    @property
    def model_title(self) -> str:
        return f"{self.model_name} [{self.model_sha256[:10]}]"


class JobStore:
    """The interface; `durable`: whether jobs outlive the process (if not, the server forgets a job here when
    it drops it from memory)."""

    durable = False

    def add(self, record: JobRecord) -> None:
        """A newly accepted job (stored before the client hears of it)."""
        raise NotImplementedError

    def add_image(self, job_id: str, image: StoredImage) -> None:
        raise NotImplementedError

    def set_status(self, job_id: str, status: str, finished: float | None, error: str | None) -> None:
        raise NotImplementedError

    def get(self, job_id: str) -> JobRecord | None:
        raise NotImplementedError

    def unfinished(self) -> list[JobRecord]:
        """Jobs queued or running when the last server stopped, in the order they were accepted."""
        raise NotImplementedError

    def delete(self, job_id: str) -> None:
        raise NotImplementedError

    def expire(self, before: float) -> list[str]:
        """Forget the jobs that finished before `before` (seconds since the epoch); their ids."""
        raise NotImplementedError

    def close(self) -> None:
        pass


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


_TABLES = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- acceptance order
    id TEXT NOT NULL UNIQUE,
    model_name TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    options TEXT NOT NULL,                  -- JSON: Options.to_dict()
    jobs TEXT NOT NULL,                     -- JSON: [[index, prompt, seed], ...]
    init_image BLOB, init_hash TEXT, mask BLOB, mask_hash TEXT,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    finished REAL,
    error TEXT
);
CREATE TABLE IF NOT EXISTS images (
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    parameters TEXT NOT NULL,
    sampler TEXT NOT NULL,
    PRIMARY KEY (job_id, idx)
);
"""
_COLUMNS = (
    "id, model_name, model_sha256, options, jobs, init_image, init_hash, mask, mask_hash,"
    " status, created, finished, error"
)


class SqliteStore(JobStore):
    durable = True

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.images = self.folder / "images"
        try:
            self.images.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--state-dir {self.folder}: cannot create it ({e.strerror})") from None
        self._lock = _lock(self.folder / "lock")
        path = self.folder / "jobs.sqlite3"
        try:
            # check_same_thread off: opened where the app is made, used on the event loop's thread, one call
            # at a time. FULL: a commit is on disk, not only in the OS's cache, before the client hears of it.
            self._db = sqlite3.connect(path, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate(path)
            self._sweep()
        except sqlite3.Error as e:
            self.close()
            raise ValueError(f"--state-dir {self.folder}: {path.name} is not a gen job store ({e})") from None
        except ValueError:
            self.close()
            raise

    def _migrate(self, path: Path) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA):
            raise ValueError(
                f"--state-dir {self.folder}: {path.name} has schema {version}, this gen reads {SCHEMA}; "
                "use another --state-dir"
            )
        with self._db:
            self._db.executescript(_TABLES)
            self._db.execute(f"PRAGMA user_version={SCHEMA}")

    def _sweep(self) -> None:
        """What a crash can leave: image folders of jobs deleted or expired in the middle, temporaries."""
        known = {row[0] for row in self._db.execute("SELECT id FROM jobs")}
        for folder in self.images.iterdir():
            if folder.name not in known:
                shutil.rmtree(folder, ignore_errors=True)
            else:
                for tmp in folder.glob(".*.tmp"):
                    tmp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction; SQLite's errors as OSError (the server answers those 503)."""
        try:
            with self._db:
                yield self._db
        except sqlite3.Error as e:
            raise OSError(f"job store {self.folder}: {e}") from None

    def add(self, record: JobRecord) -> None:
        init = record.init or StoredInit(None, None)
        values = (
            record.id,
            record.model_name,
            record.model_sha256,
            json.dumps(record.options),
            json.dumps(record.jobs),
            init.image,
            init.image_hash,
            init.mask,
            init.mask_hash,
            record.status,
            record.created,
            record.finished,
            record.error,
        )
        with self._transaction() as db:
            db.execute(f"INSERT INTO jobs ({_COLUMNS}) VALUES ({', '.join('?' * len(values))})", values)

    def add_image(self, job_id: str, image: StoredImage) -> None:
        # The file first: a row always names a complete PNG. A crash between the two leaves a file without a
        # row; the image is then rendered again and the file replaced, never counted twice.
        folder = self.images / job_id
        folder.mkdir(exist_ok=True)
        with atomic_write(folder / f"{image.index}.png") as tmp:
            tmp.write_bytes(image.png)
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO images (job_id, idx, parameters, sampler) VALUES (?, ?, ?, ?)",
                (job_id, image.index, image.parameters, image.sampler),
            )

    def set_status(self, job_id: str, status: str, finished: float | None, error: str | None) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET status = ?, finished = ?, error = ? WHERE id = ?",
                (status, finished, error, job_id),
            )

    def get(self, job_id: str) -> JobRecord | None:
        with self._transaction() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else self._record(row)

    def unfinished(self) -> list[JobRecord]:
        final = ", ".join("?" * len(FINAL))
        with self._transaction() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE status NOT IN ({final}) ORDER BY seq", FINAL
            ).fetchall()
        return [self._record(row) for row in rows]

    def _record(self, row: tuple) -> JobRecord:
        job_id, name, sha, options, jobs, image, image_hash, mask, mask_hash, *progress = row
        init = None if image is None else StoredInit(image, image_hash, mask, mask_hash)
        jobs = [tuple(j) for j in json.loads(jobs)]
        record = JobRecord(job_id, name, sha, json.loads(options), jobs, init, *progress)
        with self._transaction() as db:
            rows = db.execute("SELECT idx, parameters, sampler FROM images WHERE job_id = ?", (job_id,))
            for index, parameters, sampler in rows.fetchall():
                try:
                    png = (self.images / job_id / f"{index}.png").read_bytes()
                except FileNotFoundError:  # removed by hand: made again if the job is still running
                    logger.warning("job %s: image %d is missing from %s", job_id, index, self.images)
                    continue
                record.images[index] = StoredImage(index, parameters, sampler, png)
        return record

    def delete(self, job_id: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))  # and its images rows (ON DELETE CASCADE)
        # A crash before this leaves the folder: swept at the next start.
        shutil.rmtree(self.images / job_id, ignore_errors=True)

    def expire(self, before: float) -> list[str]:
        with self._transaction() as db:
            old = [r[0] for r in db.execute("SELECT id FROM jobs WHERE finished < ?", (before,)).fetchall()]
            db.executemany("DELETE FROM jobs WHERE id = ?", [(k,) for k in old])
        for job_id in old:
            shutil.rmtree(self.images / job_id, ignore_errors=True)
        return old

    def close(self) -> None:
        db = getattr(self, "_db", None)
        if db is not None:
            db.close()
            self._db = None
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None


def _lock(path: Path):
    """Hold DIR/lock for this process's life (the OS drops it when the process dies, kill -9 included): two
    servers on one folder would each run the other's queued jobs again."""
    handle = open(path, "a+")  # noqa: SIM115 (held open until close())
    if fcntl is None:
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ValueError(
            f"--state-dir {path.parent} is in use by another gen serve; give each server its own folder"
        ) from None
    return handle


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
    )


def stored_image(result: Result) -> StoredImage:
    return StoredImage(result.index, result.parameters, result.sampler, result.png)


def restore(record: JobRecord, model: ServedModel, config: ServeConfig) -> Task:
    """The Task again: finished images in place, only the others pending. The device, precision and model path
    are this server's (the weights are the same: `model` was found by their hash)."""
    o = _options(record.options)
    o.model, o.device, o.dtype, o.attention = model.path, config.device, config.dtype, config.attention
    jobs = [G.Job(index, prompt, seed) for index, prompt, seed in record.jobs]
    task = Task(model, o, jobs, None if record.init is None else _init_images(record.init))
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


def _options(stored: dict) -> G.Options:
    """Options from to_dict()'s JSON: fields this gen does not know are left out, missing ones take
    defaults."""
    known = {f.name for f in fields(G.Options)}
    values = {k: v for k, v in stored.items() if k in known}
    if values.get("guidance_interval") is not None:  # a tuple, JSON's list
        values["guidance_interval"] = tuple(values["guidance_interval"])
    return G.Options(**values)


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
