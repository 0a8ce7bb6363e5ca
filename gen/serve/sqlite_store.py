"""The job store that survives a crash: DIR/jobs.sqlite3 (WAL, one transaction per change) and
DIR/images/{id}/{k}.png, each PNG written atomically before its row says it exists, so a kill -9 at any moment
leaves every accepted job and no half image; one server per folder (DIR/lock). See gen.serve.store.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from gen.files import atomic_write
from gen.serve.records import JobRecord, JobStore, StoredImage, StoredInit
from gen.serve.tasks import FINAL

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one server per folder is then the user's to keep
    fcntl = None

logger = logging.getLogger("gen.serve.store")  # the store's log, wherever its classes live

SCHEMA = 2  # PRAGMA user_version of jobs.sqlite3 (2: the ControlNet units' pictures)


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
    error TEXT,
    control TEXT                            -- JSON: the ControlNet units' pictures, base64 PNGs
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
    " status, created, finished, error, control"
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
        if version == 1:  # a store of gen before ControlNet units: the same jobs, one column more
            with self._db:
                self._db.execute("ALTER TABLE jobs ADD COLUMN control TEXT")
                self._db.execute(f"PRAGMA user_version={SCHEMA}")
            version = SCHEMA
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
            None
            if record.control is None
            else json.dumps([base64.b64encode(p).decode() for p in record.control]),
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
        job_id, name, sha, options, jobs, image, image_hash, mask, mask_hash, *progress, control = row
        init = None if image is None else StoredInit(image, image_hash, mask, mask_hash)
        jobs = [tuple(j) for j in json.loads(jobs)]
        record = JobRecord(job_id, name, sha, json.loads(options), jobs, init, *progress)
        record.control = None if control is None else [base64.b64decode(p) for p in json.loads(control)]
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
