"""`gen bench --serve --minutes M`: a soak. C clients keep sending a mix (A1111 txt2img, OpenAI images, the jobs
API with its event stream; 1-4 images; one request in five a bad one that must get a 4xx) to one server for M
minutes (and at most MAX_REQUESTS_PER_CLIENT_S requests per client-second); it samples the server's resident
memory from the start (after warm-up) to the end against RSS_BOUND_MIB, checks that every request got its own
images once, and compares a sample spread over the whole run with the CLI's images. The printed report is
gen.tools.soak_report's.
"""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from gen.tools.serve_bench import PROMPTS, _get, _post, _start, percentiles, render_alone, stop
from gen.tools.soak_report import format_soak as format_soak  # re-exported: the CLI prints it from here

# The soak, `gen bench --serve --minutes M`: C clients keep sending a mix of requests for M minutes to one server
# on 127.0.0.1, its resident memory sampled along the way.

# Good requests cycle through these (API, images); every API sends the same steps and guidance, so requests of
# all three share batches, and 1-4 images make the queue split and combine them across pipeline calls.
SOAK_MIX = (
    ("a1111", 1),
    ("openai", 2),
    ("jobs", 1),
    ("a1111", 4),
    ("openai", 1),
    ("jobs", 3),
    ("a1111", 2),
    ("openai", 4),
    ("jobs", 2),
)
SEED_STRIDE = max(n for _, n in SOAK_MIX)  # request k's images have seeds S + k*STRIDE + j: all distinct
SOAK_ROUTES = {  # API -> (route, its field for the image count, its field for guidance)
    "a1111": ("/sdapi/v1/txt2img", "batch_size", "cfg_scale"),
    "openai": ("/v1/images/generations", "n", "guidance_scale"),
    "jobs": ("/gen/v1/jobs", "n", "guidance"),
}
# Bad requests, one in BAD_EVERY: each must be refused with a 4xx before it reaches the queue.
BAD_EVERY = 5
BAD_REQUESTS = (
    ("/sdapi/v1/txt2img", {"prompt": "steps 0", "steps": 0}),
    ("/v1/images/generations", {"prompt": "a size that is no size", "size": "big"}),
    ("/gen/v1/jobs", {"prompt": "an unknown field", "colour": "red"}),
    ("/sdapi/v1/txt2img", {"prompt": "steps over --max-steps", "steps": 100_000}),
    ("/v1/images/generations", {"prompt": "n over --max-images", "n": 1000}),
    ("/gen/v1/jobs", b'{"prompt": "malformed JSON"'),
)
GUIDANCE = 5.0
# The count bound beside the time bound: a client sends at most this many requests a second on average (bad ones
# are answered in milliseconds), so a fast device cannot make an unbounded run.
MAX_REQUESTS_PER_CLIENT_S = 20
KEEP_IMAGES = 64  # images kept for the CLI comparison: between this and twice this, spread over the whole run
RSS_SAMPLES = 6  # memory samples in between the start and the end
# The memory bound, growth from the start (after warm-up) to the end, in MiB rather than a share of the start:
# most of a server's RSS is torch and the weights, which a leak does not touch, while what a leak adds grows with
# the images served, so a longer soak catches a smaller leak (at 5 images/s a leak of 60 KB an image fails in 3
# minutes, of 10 KB in 18). 50 MiB sits well above the allocator's swings within a run (up to 8 MiB above the
# start and 22 below, measured on the embedded model) and what the job store legitimately adds (at most 256
# finished jobs with their 64x64 PNGs of about 7 KB each: under 5 MiB).
RSS_BOUND_MIB = 50


@dataclass
class Answer:
    """One soak request: what it asked for and what came back."""

    k: int
    api: str  # a1111, openai, jobs; bad for a request that must be refused
    seeds: list[int]  # the seeds it asked for (none for a bad request)
    status: int | None = None  # HTTP status of the answer; None: no answer
    got: list[int] = field(default_factory=list)  # the seeds of the images that came back
    latency: float = 0.0
    error: str | None = None


class Kept:
    """Images kept for the CLI comparison, evenly spread over the run however long it is: every image is offered
    with its running number; when more than twice `size` are held, every other one is dropped and only every
    (2·stride)-th number is taken from then on."""

    def __init__(self, size: int):
        self.size, self.stride, self.count, self.items = size, 1, 0, []
        self.lock = threading.Lock()

    def offer(self, prompt: str, seed: int, png: bytes) -> None:
        with self.lock:
            i, self.count = self.count, self.count + 1
            if i % self.stride:
                return
            self.items.append((i, prompt, seed, png))
            if len(self.items) > 2 * self.size:
                self.stride *= 2
                self.items = [item for item in self.items if item[0] % self.stride == 0]


@dataclass
class Soak:
    minutes: float
    limit: int  # the count bound
    answers: list[Answer] = field(default_factory=list)
    rss: list[tuple[float, int | None]] = field(default_factory=list)  # (seconds into the soak, VmRSS KiB)
    kept: Kept = field(default_factory=lambda: Kept(KEEP_IMAGES))
    wall_s: float = 0.0
    stats: dict = field(default_factory=dict)
    exit_code: int | None = None
    next_k: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self) -> int | None:
        """The next request number, None once the count bound is reached."""
        with self.lock:
            k, self.next_k = self.next_k, self.next_k + 1
        return k if k < self.limit else None


def rss_kib(pid: int) -> int | None:
    """The process's resident memory (VmRSS in /proc/PID/status, KiB); None where there is no /proc."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _call(url: str, body: dict | bytes | None, timeout: float) -> tuple[int, bytes]:
    """(status, body) of a POST, or a GET when `body` is None; 4xx and 5xx answers are returned, not raised."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def soak_request(k: int, seed: int, steps: int) -> tuple[str, str, dict | bytes, list[int]]:
    """Request k of the soak: (API, route, body, the seeds it asks for)."""
    if k % BAD_EVERY == BAD_EVERY - 1:
        route, body = BAD_REQUESTS[(k // BAD_EVERY) % len(BAD_REQUESTS)]
        return "bad", route, body, []
    api, n = SOAK_MIX[k % len(SOAK_MIX)]
    route, count, guidance = SOAK_ROUTES[api]
    first = seed + k * SEED_STRIDE
    body = {"prompt": PROMPTS[k % len(PROMPTS)], "seed": first, "steps": steps, count: n, guidance: GUIDANCE}
    return api, route, body, list(range(first, first + n))


def _job_end(url: str, job_id: str, timeout: float) -> dict:
    """A job's final view: the data of the last event of its stream, the one named by the outcome."""
    name = None
    with urllib.request.urlopen(f"{url}/gen/v1/jobs/{job_id}/events", timeout=timeout) as stream:
        for raw in stream:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: ") and name not in ("state", "image"):
                return json.loads(line[len("data: ") :])
    raise ValueError(f"job {job_id}: the event stream ended without an outcome")


def _job_images(url: str, job: dict, timeout: float) -> list[tuple[int, bytes]]:
    end = _job_end(url, job["id"], timeout)
    if end["status"] != "done":
        raise ValueError(f"job {job['id']} ended {end['status']}: {end['error']}")
    images = []
    for image in end["images"]:
        status, png = _call(url + image["url"], None, timeout)
        if status != 200:
            raise ValueError(f"job {job['id']}: {image['url']} answered {status}")
        images.append((image["seed"], png))
    return images


def answer_images(api: str, url: str, answer: dict, timeout: float) -> list[tuple[int, bytes]]:
    """(seed, PNG) of every image in an answer, as each API says it."""
    if api == "a1111":
        seeds = json.loads(answer["info"])["all_seeds"]
        return [(s, base64.b64decode(b)) for s, b in zip(seeds, answer["images"], strict=True)]
    if api == "openai":
        return [(d["seed"], base64.b64decode(d["b64_json"])) for d in answer["data"]]
    return _job_images(url, answer, timeout)


def send(soak: Soak, url: str, k: int, seed: int, steps: int, deadline: float) -> Answer:
    api, route, body, seeds = soak_request(k, seed, steps)
    answer, start = Answer(k, api, seeds), time.monotonic()
    try:
        answer.status, raw = _call(url + route, body, deadline - start)
        if api != "bad" and answer.status not in (200, 202):
            raise ValueError(f"answered {answer.status}: {raw[:200].decode(errors='replace')}")
        if api != "bad":
            images = answer_images(api, url, json.loads(raw), deadline - time.monotonic())
            answer.got = [s for s, _ in images]
            for s, png in images:
                soak.kept.offer(body["prompt"], s, png)
    except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
        answer.error = f"request {k} ({api}): {e}"
    answer.latency = time.monotonic() - start
    return answer


def _sample_rss(soak: Soak, pid: int, start: float, stop: threading.Event) -> None:
    """VmRSS now and RSS_SAMPLES times in between, until `stop` (the end sample is taken after the load)."""
    interval = soak.minutes * 60 / (RSS_SAMPLES + 1)
    while True:
        soak.rss.append((time.monotonic() - start, rss_kib(pid)))
        if stop.wait(interval):
            return


def _warm_up(url: str, max_batch: int, seed: int, steps: int, deadline: float) -> None:
    """One full batch (the largest activations the soak will see) and the soak's first dozen requests (every API,
    bad ones too; seeds apart from the soak's, answers not counted), so the memory measured at the start already
    holds what serving needs."""
    body = {"prompt": "warm-up", "steps": steps, "batch_size": max_batch}
    _post(url + "/sdapi/v1/txt2img", body, deadline - time.monotonic())
    scratch = Soak(minutes=0, limit=0)
    for k in range(12):
        send(scratch, url, k, seed + 10**6, steps, deadline)


def soak_load(soak: Soak, url: str, pid: int, clients: int, seed: int, steps: int, deadline: float) -> None:
    """C clients sending requests one after another until M minutes are over or the count bound is reached."""

    def client() -> None:
        while time.monotonic() < stop_at and (k := soak.take()) is not None:
            soak.answers.append(send(soak, url, k, seed, steps, deadline))

    before = _get(url + "/gen/v1/info")["queue"]
    start = time.monotonic()
    stop_at = min(start + soak.minutes * 60, deadline)
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_rss, args=(soak, pid, start, stop), daemon=True)
    sampler.start()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda _: client(), range(clients)))  # list(): a client's exception is raised here
    soak.wall_s = time.monotonic() - start
    stop.set()
    sampler.join()
    soak.rss.append((soak.wall_s, rss_kib(pid)))
    after = _get(url + "/gen/v1/info")["queue"]
    soak.stats = {k: after[k] - before[k] for k in ("batches", "images")} | {
        "largest_batch": after["largest_batch"]
    }


def serve_and_soak(
    model: str | None, clients: int, minutes: float, steps: int, max_batch: int, seed: int, deadline: float
) -> Soak:
    soak = Soak(minutes, limit=int(clients * minutes * 60 * MAX_REQUESTS_PER_CLIENT_S) + clients)
    # Each client has one request open at a time, so a queue of C never answers 429.
    url, process = _start(max_batch, model, clients + 1, deadline)
    try:
        _warm_up(url, max_batch, seed, steps, deadline)
        soak_load(soak, url, process.pid, clients, seed, steps, deadline)
    finally:
        soak.exit_code = stop(process, deadline)
    return soak


def compare_kept(model: str | None, steps: int, kept: Kept) -> dict:
    """The kept images against their CLI twins (made alone): equal within PIXEL_TOLERANCE, as images made beside
    batch-mates may differ by a level on a few pixels on some CPUs; also how many are bit-identical."""
    import numpy as np
    from PIL import Image

    from gen.generation.metadata import PIXEL_TOLERANCE

    items = sorted(kept.items)
    expected = render_alone(model, steps, [(prompt, seed) for _, prompt, seed, _ in items])
    diffs = []
    for (*_, png), twin in zip(items, expected, strict=True):
        served = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
        diffs.append(int(np.abs(served - twin.astype(np.int16)).max()))
    return {
        "checked": len(diffs),
        "cli_equal": sum(d <= PIXEL_TOLERANCE for d in diffs),
        "bit_identical": sum(d == 0 for d in diffs),
        "max_pixel_diff": max(diffs, default=0),
        "tolerance": PIXEL_TOLERANCE,
    }


def api_row(answers: list[Answer]) -> dict:
    """Requests, images, lost (asked-for seeds that did not come back to the request that asked), duplicated
    (images beyond a seed's first), foreign (seeds a request did not ask for), 4xx answers, latency."""
    got = [s for a in answers for s in a.got]
    return {
        "requests": len(answers),
        "images": len(got),
        "lost": sum(len(set(a.seeds) - set(a.got)) for a in answers),
        "duplicated": len(got) - len(set(got)),
        "foreign": sum(len(set(a.got) - set(a.seeds)) for a in answers),
        "answered_4xx": sum(a.status is not None and 400 <= a.status < 500 for a in answers),
        **percentiles([a.latency for a in answers if a.error is None]),
    }


def statuses(answers: list[Answer]) -> dict[str, int]:
    """How many answers had each HTTP status ("none": no answer)."""
    counts: dict[str, int] = {}
    for a in answers:
        counts[str(a.status or "none")] = counts.get(str(a.status or "none"), 0) + 1
    return dict(sorted(counts.items()))


def memory(rss: list[tuple[float, int | None]]) -> dict:
    """The RSS samples in MiB (minutes into the soak, MiB), the start (after warm-up), end, growth, the bound."""
    samples = [(round(t / 60, 2), None if kib is None else round(kib / 1024, 1)) for t, kib in rss]
    values = [mib for _, mib in samples]
    measured = len(values) >= 2 and None not in values
    growth = round(values[-1] - values[0], 1) if measured else None
    return {
        "rss_samples": samples,
        "rss_start_mib": values[0] if measured else None,
        "rss_end_mib": values[-1] if measured else None,
        "rss_peak_mib": max(values) if measured else None,
        "rss_growth_mib": growth,
        "rss_bound_mib": RSS_BOUND_MIB,
        "memory_ok": measured and growth <= RSS_BOUND_MIB,
    }


def soak_benchmark(
    model: str | None = None,
    clients: int = 8,
    minutes: float = 3.0,
    steps: int = 8,
    max_batch: int = 8,
    seed: int = 1000,
    timeout: float | None = None,
) -> dict:
    """The soak and the CLI comparison, all within `timeout` seconds (default: M minutes + 10 minutes); the report
    `format_soak` prints."""
    deadline = time.monotonic() + (timeout or minutes * 60 + 600)
    soak = serve_and_soak(model, clients, minutes, steps, max_batch, seed, deadline)
    apis = {api: api_row([a for a in soak.answers if a.api == api]) for api in (*SOAK_ROUTES, "bad")}
    total = api_row([a for a in soak.answers if a.api != "bad"])  # duplicates across APIs count too
    report = {
        "minutes": minutes,
        "clients": clients,
        "steps": steps,
        "max_batch": max_batch,
        "model": model or "embedded",
        "torch_threads": os.environ.get("OMP_NUM_THREADS", "default"),
        "apis": apis,
        **{k: total[k] for k in ("requests", "images", "lost", "duplicated", "foreign")},
        "bad": apis["bad"]["requests"],
        "bad_4xx": apis["bad"]["answered_4xx"],
        "bad_statuses": statuses([a for a in soak.answers if a.api == "bad"]),
        "failures": [a.error for a in soak.answers if a.error][:5],
        "wall_s": round(soak.wall_s, 2),
        "images_per_s": round(total["images"] / soak.wall_s, 3) if soak.wall_s else 0.0,
        **soak.stats,
        **memory(soak.rss),
        **compare_kept(model, steps, soak.kept),
        "exit_code": soak.exit_code,
    }
    report["verdicts"] = verdicts(report)
    report["ok"] = all(report["verdicts"].values())
    return report


def verdicts(r: dict) -> dict[str, bool]:
    return {
        "delivery": r["images"] > 0 and r["lost"] == r["duplicated"] == r["foreign"] == 0,
        "bad requests": r["bad"] > 0 and r["bad_4xx"] == r["bad"],
        "memory": r["memory_ok"],
        "images": r["checked"] > 0 and r["cli_equal"] == r["checked"],
        "exit": r["exit_code"] == 0,
    }
