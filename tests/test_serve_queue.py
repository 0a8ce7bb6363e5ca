"""The queue: concurrent requests batched into one pipeline call with every image equal to the CLI's, 429 with
Retry-After when full, a hung-up client's job dropped, cancel, and a graceful SIGTERM of a real `gen serve`."""

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.images import assert_same_image
from tests.serve_support import (
    cli_image,
    gen_serve_process,
    png,
    serving,
    shared_models,
    wait_until,
)

PROMPTS = [
    "a red circle on a blue background",
    "a small yellow star in the top left on a black background",
    "a large green square in the centre on a white background",
    "a purple triangle in the bottom right on a yellow background",
]


@pytest.fixture(scope="module", autouse=True)
def models():
    return shared_models()


def blocker(http: httpx.Client, steps: int = 150) -> str:
    """A long native job that keeps the worker busy, so later requests queue up; its id."""
    job = http.post(
        "/gen/v1/jobs", json={"prompt": "block", "steps": steps, "seed": 0, "negative_prompt": "z"}
    ).json()
    wait_until(lambda: http.get(f"/gen/v1/jobs/{job['id']}").json()["status"] == "running")
    return job["id"]


def test_concurrent_requests_share_a_batch_and_equal_the_cli(tmp_path):
    requests = [(PROMPTS[k % 4], 100 + 7 * k) for k in range(6)]
    with serving(max_batch=8) as server, server.client() as http:
        block = blocker(http)
        with ThreadPoolExecutor(6) as pool:  # six A1111 clients at once, different prompts and seeds
            futures = [
                pool.submit(
                    http.post, "/sdapi/v1/txt2img", json={"prompt": p, "seed": s, "steps": 4, "cfg_scale": 5}
                )
                for p, s in requests
            ]
            wait_until(lambda: len(server.state.queue.queued_tasks()) == 6)
            http.delete(f"/gen/v1/jobs/{block}")
            answers = [f.result().json() for f in futures]
        stats = http.get("/gen/v1/info").json()["queue"]
    assert (
        stats["largest_batch"] == 6 and stats["batches"] == 1
    )  # one pipeline call (the blocker never finished)
    for (prompt, seed), answer in zip(requests, answers, strict=True):
        served = png(answer["images"][0])
        assert f"Seed: {seed}" in served.text["parameters"] and served.text["parameters"].startswith(prompt)
        assert_same_image(served, cli_image(tmp_path, prompt, seed, "--steps", "4"))  # in a batch of 6


def test_incompatible_requests_are_not_batched_and_long_requests_split():
    with serving(max_batch=3) as server, server.client() as http:
        block = blocker(http)
        jobs = [
            http.post("/gen/v1/jobs", json={"prompt": "a", "n": 4, "steps": 2, "seed": 1}).json(),
            http.post(
                "/gen/v1/jobs", json={"prompt": "b", "n": 1, "steps": 3, "seed": 1}
            ).json(),  # other steps
            http.post("/gen/v1/jobs", json={"prompt": "c", "n": 2, "steps": 2, "seed": 1}).json(),
        ]
        assert [j["position"] for j in jobs] == [0, 1, 2]
        http.delete(f"/gen/v1/jobs/{block}")
        for job in jobs:
            wait_until(lambda j=job: http.get(f"/gen/v1/jobs/{j['id']}").json()["status"] == "done")
        stats = http.get("/gen/v1/info").json()["queue"]
        seeds = [[i["seed"] for i in http.get(f"/gen/v1/jobs/{j['id']}").json()["images"]] for j in jobs]
    # a(3) | a(1)+c(2) | b(1): 4 + 1 + 2 images in three calls, never more than --max-batch
    assert (stats["batches"], stats["images"], stats["largest_batch"]) == (3, 7, 3)
    assert seeds == [[1, 2, 3, 4], [1], [1, 2]]


def test_full_queue_answers_429_with_retry_after():
    with serving(max_batch=1, max_queue=1) as server, server.client() as http:
        block = blocker(http)
        queued = http.post("/gen/v1/jobs", json={"prompt": "q", "steps": 2})
        assert queued.status_code == 202 and queued.json()["position"] == 0
        full = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2})
        assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
        assert full.json()["error"] == "queue_full" and "queue is full" in full.json()["detail"]
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.images.generate(prompt="x")
        for job in (block, queued.json()["id"]):
            assert http.delete(f"/gen/v1/jobs/{job}").json()["status"] == "cancelled"
        assert http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1}).status_code == 200


def test_a_client_that_hangs_up_loses_its_queued_job():
    with serving(max_batch=1) as server, server.client() as http:
        block = blocker(http)
        with pytest.raises(httpx.ReadTimeout):
            http.post("/sdapi/v1/txt2img", json={"prompt": "gone", "steps": 2}, timeout=1.0)
        wait_until(lambda: not server.state.queue.waiting, timeout=5)
        http.delete(f"/gen/v1/jobs/{block}")
        assert http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1}).status_code == 200
        assert server.state.queue.stats["images"] == 1  # only the last request was ever rendered


def test_cancel_a_running_job_stops_its_batch():
    with serving() as server, server.client() as http:
        block = blocker(http, steps=150)
        start = time.monotonic()
        cancelled = http.delete(f"/gen/v1/jobs/{block}").json()
        assert cancelled["status"] == "cancelled" and cancelled["images"] == []
        wait_until(lambda: not server.state.queue.running, timeout=5)
        assert time.monotonic() - start < 5 and server.state.queue.stats["batches"] == 0


def test_sigterm_finishes_the_running_batch_answers_the_queue_503_and_exits_0():
    with (
        gen_serve_process("--max-batch", "1", "--state-dir", "none") as (url, process),
        httpx.Client(base_url=url, timeout=120) as http,
    ):
        answers = {}

        def post(name, steps):
            answers[name] = http.post("/sdapi/v1/txt2img", json={"prompt": name, "steps": steps, "seed": 1})

        running = threading.Thread(target=post, args=("running", 60))
        running.start()
        wait_until(lambda: http.get("/sdapi/v1/progress").json()["state"]["sampling_step"] >= 1, timeout=60)
        queued = threading.Thread(target=post, args=("queued", 2))
        queued.start()
        wait_until(lambda: http.get("/sdapi/v1/progress").json()["state"]["job_count"] == 2)
        process.send_signal(signal.SIGTERM)
        queued.join(60)
        running.join(120)
        assert process.wait(60) == 0
        assert answers["queued"].status_code == 503 and answers["queued"].json()["error"] == "unavailable"
        done = answers["running"]
        assert done.status_code == 200 and "Steps: 60" in png(done.json()["images"][0]).text["parameters"]
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/gen/v1/info", timeout=2)


def test_finished_jobs_are_forgotten_beyond_keep_jobs():
    with serving(keep_jobs=2) as server, server.client() as http:
        ids = []
        for k in range(3):
            ids.append(http.post("/gen/v1/jobs", json={"prompt": "x", "steps": 1, "seed": k}).json()["id"])
            wait_until(lambda i=ids[-1]: http.get(f"/gen/v1/jobs/{i}").json()["status"] == "done")
        assert [http.get(f"/gen/v1/jobs/{i}").status_code for i in ids] == [404, 200, 200]


def test_a_request_whose_render_fails_fails_alone(tmp_path, monkeypatch):
    """A batch that fails for one member is rendered again request by request: the others get their images
    (each now made alone: the CLI's, bit for bit), the culprit a one-line error."""
    from gen.serve import queue

    real = queue.render_batch

    def fragile(model, o, jobs, on_step, init=None, control=None):
        if any("boom" in job.prompt for job in jobs):
            raise RuntimeError("the text encoder choked")
        return real(model, o, jobs, on_step, init, control)

    monkeypatch.setattr(queue, "render_batch", fragile)
    requests = [("a red circle", 1), ("boom", 2), ("a blue star", 3)]
    with serving(max_batch=8) as server, server.client() as http:
        block = blocker(http)
        with ThreadPoolExecutor(3) as pool:
            body = {"steps": 4, "cfg_scale": 5}
            futures = [
                pool.submit(http.post, "/sdapi/v1/txt2img", json={"prompt": p, "seed": s, **body})
                for p, s in requests
            ]
            wait_until(lambda: len(server.state.queue.queued_tasks()) == 3)
            http.delete(f"/gen/v1/jobs/{block}")
            answers = [f.result() for f in futures]
        assert http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1}).status_code == 200
    assert [a.status_code for a in answers] == [200, 500, 200], [a.text for a in answers]
    assert answers[1].json()["detail"] == "generation failed: the text encoder choked"
    for (prompt, seed), answer in zip(requests, answers, strict=True):
        if answer.status_code == 200:
            cli = cli_image(tmp_path, prompt, seed, "--steps", "4")
            assert_same_image(png(answer.json()["images"][0]), cli, exact=True)


def test_max_steps_bounds_the_default_steps():
    with serving(max_steps=3) as server, server.client() as http:
        assert http.get("/gen/v1/info").json()["defaults"]["steps"] == 3  # the web page shows this
        a1111 = http.post("/sdapi/v1/txt2img", json={"prompt": "x"})
        assert a1111.status_code == 200 and "Steps: 3," in png(a1111.json()["images"][0]).text["parameters"]
        openai_style = http.post("/v1/images/generations", json={"prompt": "x", "size": "64x64"})
        assert "Steps: 3," in png(openai_style.json()["data"][0]["b64_json"]).text["parameters"]
        events = http.post("/gen/v1/jobs?stream=true", json={"prompt": "x"}).text
        assert "Steps: 3," in events
