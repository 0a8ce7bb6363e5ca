"""Durable native jobs (`gen serve --state-dir`): stored before the 202, resumed after a kill -9 with only
their unfinished images pending, finished ones served unchanged until --keep-jobs hours; DELETE forgets;
SIGTERM keeps queued jobs for the next start; the two stores behind one interface."""

import base64
import io
import threading
import time

import httpx
import pytest
from PIL import Image

from gen import generation as G
from gen.generation.inputs import init_images
from gen.serve import store as S
from gen.serve.config import ServeConfig
from gen.serve.models import ServedModel
from gen.serve.tasks import Task
from tests.images import assert_same_image, pixels
from tests.serve_support import (
    cli_image,
    gen_serve_process,
    init_pictures,
    serving,
    shared_models,
    wait_until,
)

JOBS = "/gen/v1/jobs"
MODEL = ServedModel(None, "stand-in", "ab" * 32, None, None)  # the store needs a name and hash, not weights
SETTINGS = {"steps": 20, "sampler": "euler", "guidance": 5.0}  # and the same on the command line:
CLI = ["--steps", "20", "--sampler", "euler", "--cfg", "5"]


def make_task(n: int = 3, init=None) -> Task:
    o = G.Options(prompt="a red circle", num_images=n, seed=7, steps=6, width=64, height=48)
    if init is not None:
        o.init_image, o.mask, o.strength = "upload.png", "mask.png", 0.5
    return Task(MODEL, o, list(G.plan([o.prompt], n, 7)), init)


def png_bytes(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def image(k: int) -> S.StoredImage:
    return S.StoredImage(k, f"parameters {k}", "Euler", png_bytes((k, 2 * k, 3 * k)))


# --- the stores ---


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    opened = S.MemoryStore() if request.param == "memory" else S.SqliteStore(tmp_path / "state")
    yield opened
    opened.close()


def test_a_stored_job_its_images_and_status(store):
    task = make_task()
    store.add(S.record_of(task))
    store.add_image(task.id, image(1))
    [record] = store.unfinished()
    assert record.id == task.id and record.options == task.options.to_dict() and record.status == "queued"
    assert record.jobs == [(0, "a red circle", 7), (1, "a red circle", 8), (2, "a red circle", 9)]
    assert record.images == {1: image(1)}
    store.set_status(task.id, "failed", 123.0, "generation failed: boom")
    assert store.unfinished() == []
    again = store.get(task.id)
    assert (again.status, again.finished, again.error) == ("failed", 123.0, "generation failed: boom")


def test_finished_images_are_not_pending_again(store):
    task = make_task(n=4)
    store.add(S.record_of(task))
    for k in (0, 2):
        store.add_image(task.id, image(k))
    restored = S.restore(store.unfinished()[0], MODEL, ServeConfig())
    assert list(restored.pending) == [1, 3] and restored.id == task.id and restored.created == task.created
    assert [r.index for r in restored.images()] == [0, 2] and restored.results[2].png == image(2).png
    assert restored.results[2].seed == 9 and restored.key == task.key  # batches with new requests alike


def test_expiry_by_finish_time(store):
    now = time.time()
    old, recent, running = make_task(), make_task(), make_task()
    for task in (old, recent, running):
        store.add(S.record_of(task))
        store.add_image(task.id, image(0))
    store.set_status(old.id, "done", now - 3 * 3600, None)
    store.set_status(recent.id, "done", now - 3600, None)
    assert store.expire(now - 2 * 3600) == [old.id]
    assert store.get(old.id) is None and store.get(recent.id).status == "done"
    assert [r.id for r in store.unfinished()] == [running.id]  # unfinished jobs never expire
    if store.durable:
        assert not (store.images / old.id).exists() and (store.images / recent.id / "0.png").exists()


def test_delete_forgets(store):
    task = make_task()
    store.add(S.record_of(task))
    store.add_image(task.id, image(0))
    store.delete(task.id)
    assert store.get(task.id) is None and store.unfinished() == []
    if store.durable:
        assert not (store.images / task.id).exists()


def test_a_job_survives_reopening_with_its_init_pictures(tmp_path):
    picture, mask = init_pictures(tmp_path)
    init = init_images(picture, mask, mask_blur=2, invert_mask=True)
    task = make_task(n=2, init=init)
    first = S.SqliteStore(tmp_path / "state")
    first.add(S.record_of(task))
    first.add_image(task.id, image(0))
    first.close()
    reopened = S.SqliteStore(tmp_path / "state")
    try:
        restored = S.restore(reopened.unfinished()[0], MODEL, ServeConfig())
    finally:
        reopened.close()
    assert list(restored.pending) == [1] and restored.results[0].png == image(0).png
    assert restored.options == task.options
    again = restored.init
    assert (again.image_hash, again.mask_hash) == (init.image_hash, init.mask_hash)
    assert again.image.mode == "RGB" and again.mask.mode == "L"  # the mask as rendered: inverted, blurred
    assert (pixels(again.image) == pixels(init.image)).all()
    assert list(again.mask.getdata()) == list(init.mask.getdata())


def test_one_server_per_folder_and_foreign_files_refused(tmp_path):
    first = S.SqliteStore(tmp_path / "state")
    try:
        with pytest.raises(ValueError, match="in use by another gen serve"):
            S.SqliteStore(tmp_path / "state")
    finally:
        first.close()
    S.SqliteStore(tmp_path / "state").close()  # free again
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "jobs.sqlite3").write_bytes(
        b"not a database, but long enough to be read as one" * 4
    )
    with pytest.raises(ValueError, match="is not a gen job store"):
        S.SqliteStore(tmp_path / "other")


def test_config_and_flags():
    from gen.cli.main import serve_parser

    args = serve_parser().parse_args([])
    assert args.state_dir.endswith("gen/serve") and args.keep_hours == 24.0
    assert ServeConfig().state_dir is None  # the library's default: memory (tests, embedding)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="--keep-jobs .* must be a number of hours > 0"):
            ServeConfig(keep_hours=bad).check()


# --- the server ---


@pytest.fixture(scope="module", autouse=True)
def models():
    return shared_models()


def status(http: httpx.Client, job_id: str) -> str:
    return http.get(f"{JOBS}/{job_id}").json()["status"]


def test_delete_forgets_a_job_and_ends_its_stream(tmp_path):
    with serving(state_dir=str(tmp_path / "state")) as server, server.client() as http:
        done = http.post(JOBS, json={"prompt": "x", "steps": 1, "seed": 1}).json()["id"]
        wait_until(lambda: status(http, done) == "done")
        url = http.get(f"{JOBS}/{done}").json()["images"][0]["url"]
        forgotten = http.delete(f"{JOBS}/{done}")
        assert forgotten.status_code == 200 and forgotten.json()["status"] == "done"
        assert [http.get(u).status_code for u in (f"{JOBS}/{done}", url, f"{JOBS}/{done}/events")] == [
            404
        ] * 3
        assert http.delete(f"{JOBS}/{done}").status_code == 404
        assert not (tmp_path / "state" / "images" / done).exists()

        running = http.post(JOBS, json={"prompt": "long", "steps": 150, "seed": 2}).json()["id"]
        events = []

        def follow():
            with http.stream("GET", f"{JOBS}/{running}/events") as stream:
                events.extend(line[7:] for line in stream.iter_lines() if line.startswith("event: "))

        reader = threading.Thread(target=follow)
        reader.start()
        wait_until(lambda: status(http, running) == "running")
        assert http.delete(f"{JOBS}/{running}").json()["status"] == "cancelled"
        reader.join(10)
        assert events[-1] == "cancelled" and http.get(f"{JOBS}/{running}").status_code == 404


def test_sigterm_keeps_queued_jobs_for_the_next_start(tmp_path):
    state = str(tmp_path / "state")
    with serving(state_dir=state, max_batch=1) as server, server.client() as http:
        running = http.post(JOBS, json={"prompt": "running", "steps": 40, "seed": 3}).json()["id"]
        wait_until(lambda: status(http, running) == "running")
        queued = http.post(JOBS, json={"prompt": "queued", "steps": 2, "seed": 4, "n": 2}).json()["id"]
    # stopped as by SIGTERM: the running batch finished, the queued job was told the server is going
    with serving(state_dir=state) as server, server.client() as http:
        assert status(http, running) == "done"
        wait_until(lambda: status(http, queued) == "done")
        assert [i["seed"] for i in http.get(f"{JOBS}/{queued}").json()["images"]] == [4, 5]
        assert server.state.queue.stats["images"] == 2


def test_a_job_whose_model_is_gone_fails_in_one_line(tmp_path):
    stored = S.SqliteStore(tmp_path / "state")
    task = make_task(n=1)
    stored.add(S.record_of(task))
    stored.close()
    with serving(state_dir=str(tmp_path / "state")) as server, server.client() as http:
        job = http.get(f"{JOBS}/{task.id}").json()
    assert job["status"] == "failed" and job["model"] == MODEL.title
    assert job["error"] == f"model {MODEL.title} is no longer served here (the server restarted without it)"


def test_finished_jobs_are_forgotten_after_keep_hours(tmp_path):
    with serving(state_dir=str(tmp_path / "state"), keep_hours=1 / 3600) as server, server.client() as http:
        job = http.post(JOBS, json={"prompt": "x", "steps": 1, "seed": 1}).json()["id"]
        wait_until(lambda: status(http, job) == "done")
        time.sleep(1.1)
        assert http.get(f"{JOBS}/{job}").status_code == 404
        assert not (tmp_path / "state" / "images" / job).exists()


def test_sync_requests_are_not_stored(tmp_path):
    with serving(state_dir=str(tmp_path / "state")) as server, server.client() as http:
        assert http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1}).status_code == 200
        assert http.post("/v1/images/generations", json={"prompt": "x", "steps": 1}).status_code == 200
        assert server.state.store.unfinished() == [] and not server.state.jobs
        assert list((tmp_path / "state" / "images").iterdir()) == []


# --- kill -9 ---


def data_url(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_kill_9_loses_no_job_and_duplicates_no_image(tmp_path):
    state = tmp_path / "state"
    args = ("--state-dir", str(state), "--max-batch", "1")
    picture, mask = init_pictures(tmp_path)
    inpaint = {"init_image": data_url(picture), "mask": data_url(mask), "strength": 0.6, "mask_blur": 2}
    size = ["--width", "64", "--height", "64"]
    asked = [  # (body, the CLI's arguments for the same images)
        ({"prompt": "a red circle", "seed": 10, "n": 2, "width": 64, "height": 64}, size),
        ({"prompt": "a green square", "seed": 20, "n": 3, "width": 64, "height": 64}, size),
        (
            {"prompt": "a yellow star", "seed": 30, "n": 2, **inpaint},
            ["--init-image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png")]
            + ["--strength", "0.6", "--mask-blur", "2"],
        ),
    ]
    with gen_serve_process(*args) as (url, process), httpx.Client(base_url=url, timeout=60) as http:
        first = http.post(JOBS, json={"prompt": "a blue dot", "seed": 5, "steps": 2}).json()["id"]
        wait_until(lambda: status(http, first) == "done", timeout=60)
        before = http.get(f"{JOBS}/{first}").json()
        first_png = http.get(before["images"][0]["url"]).content
        ids = []
        for body, _ in asked:
            accepted = http.post(JOBS, json={**body, **SETTINGS})
            assert accepted.status_code == 202
            ids.append(accepted.json()["id"])
        # killed in the middle of the first job: one image made, the next one running
        wait_until(lambda: len(http.get(f"{JOBS}/{ids[0]}").json()["images"]) >= 1, timeout=120)
        process.kill()
        process.wait(30)
    on_disk = S.SqliteStore(state)
    stored = {k: on_disk.get(k).images for k in ids}
    on_disk.close()
    assert len(stored[ids[0]]) >= 1 and len(stored[ids[2]]) < 2  # some made before the kill, some not

    with gen_serve_process(*args) as (url, process), httpx.Client(base_url=url, timeout=60) as http:
        assert http.get(f"{JOBS}/{first}").json() == before
        assert http.get(before["images"][0]["url"]).content == first_png
        for job in ids:
            wait_until(lambda j=job: status(http, j) == "done", timeout=300)
        views = [http.get(f"{JOBS}/{job}").json() for job in ids]
        made = {v["id"]: [http.get(i["url"]).content for i in v["images"]] for v in views}
        rendered = http.get("/gen/v1/info").json()["queue"]["images"]
    assert rendered == sum(body["n"] - len(stored[job]) for (body, _), job in zip(asked, ids, strict=True))
    for (body, cli_args), view in zip(asked, views, strict=True):
        seeds = [i["seed"] for i in view["images"]]
        assert seeds == [body["seed"] + k for k in range(body["n"])], seeds
        for k, served in stored[view["id"]].items():
            assert made[view["id"]][k] == served.png  # made before the kill: the same bytes
        for seed, data in zip(seeds, made[view["id"]], strict=True):
            cli = cli_image(tmp_path, body["prompt"], seed, *CLI, *cli_args)
            assert_same_image(Image.open(io.BytesIO(data)), cli)


def test_cancel_keeps_the_job_and_delete_forgets_it():
    shared_models()
    with serving() as server, server.client() as http:
        job = http.post("/gen/v1/jobs", json={"prompt": "x", "steps": 150, "n": 2, "seed": 3}).json()
        cancelled = http.post(f"/gen/v1/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert http.get(f"/gen/v1/jobs/{job['id']}").json()["status"] == "cancelled"  # kept
        assert http.post("/gen/v1/jobs/nope/cancel").status_code == 404
        assert http.delete(f"/gen/v1/jobs/{job['id']}").status_code == 200
        assert http.get(f"/gen/v1/jobs/{job['id']}").status_code == 404


def test_a_schema_1_store_is_migrated_in_place(tmp_path):
    """A store written before ControlNet units (schema 1: no `control` column) opens: its jobs read back, new
    ones keep their units' pictures."""
    import sqlite3

    from gen.serve.records import JobRecord
    from gen.serve.sqlite_store import SCHEMA, SqliteStore

    old = sqlite3.connect(tmp_path / "jobs.sqlite3")
    old.executescript(
        """CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
        model_name TEXT NOT NULL, model_sha256 TEXT NOT NULL, options TEXT NOT NULL, jobs TEXT NOT NULL,
        init_image BLOB, init_hash TEXT, mask BLOB, mask_hash TEXT, status TEXT NOT NULL, created REAL NOT NULL,
        finished REAL, error TEXT);
        CREATE TABLE images (job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE, idx INTEGER NOT NULL,
        parameters TEXT NOT NULL, sampler TEXT NOT NULL, PRIMARY KEY (job_id, idx));
        INSERT INTO jobs (id, model_name, model_sha256, options, jobs, status, created)
        VALUES ('old', 'm', 'abc', '{"prompt": "x"}', '[[0, "x", 1]]', 'queued', 1.0);
        PRAGMA user_version=1;"""
    )
    old.commit()
    old.close()
    store = SqliteStore(tmp_path)
    try:
        assert store._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA == 2
        assert store.get("old").control is None and store.get("old").options == {"prompt": "x"}
        store.add(JobRecord("new", "m", "abc", {}, [(0, "y", 2)], control=[b"png-bytes"]))
        assert store.get("new").control == [b"png-bytes"]
    finally:
        store.close()
