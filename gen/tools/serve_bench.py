"""`gen bench --serve`: a bounded load test of `gen serve`. C clients each send R A1111 txt2img requests (one
image, its own prompt and seed) to a real server process, first with batching (--max-batch N), then with
--max-batch 1; it checks that nothing was lost or duplicated and that every image equals its CLI twin (the image
`gen PROMPT --seed S --steps K` makes): bit for bit when made alone (--max-batch 1), within PIXEL_TOLERANCE when
made beside batch-mates (the CPU's kernels may block a batch of 3 unlike a batch of 1: 1 level measured on an Intel
AMX CPU, 0 on AMD), and reports latency percentiles and images/s for both.

The soak (`--minutes M`) is gen.tools.serve_soak, on the same machinery.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from gen import generation as G

PROMPTS = (
    "a red circle on a blue background",
    "a small yellow star in the top left on a black background",
    "a large green square in the centre on a white background",
    "a purple triangle in the bottom right on a yellow background",
    "a small white cross in the top right on a red background",
)


@dataclass
class Run:
    max_batch: int
    wall_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    answers: dict[int, dict] = field(default_factory=dict)  # request number -> the server's JSON answer
    failures: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    exit_code: int | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _get(url: str, timeout: float = 5) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def _start(max_batch: int, model: str | None, queue: int, deadline: float) -> tuple[str, subprocess.Popen]:
    port = _free_port()
    cmd = [sys.executable, "-m", "gen", "serve", "--port", str(port), "--max-batch", str(max_batch)]
    cmd += ["--max-queue", str(queue)] + (["--model", model] if model else [])
    cmd += ["--state-dir", "none"]  # a bench's jobs are not the user's: none in ~/.cache, no lock held there
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gen serve exited {process.returncode}: {process.stderr.read()[-1000:]}")
        try:
            _get(url + "/gen/v1/info", timeout=2)
            return url, process
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("gen serve did not start in time")


def request_body(k: int, seed: int, steps: int) -> dict:
    return {"prompt": PROMPTS[k % len(PROMPTS)], "seed": seed + k, "steps": steps, "cfg_scale": 5.0}


def load(run: Run, url: str, clients: int, requests: int, seed: int, steps: int, deadline: float) -> None:
    """C threads, each sending its R requests one after another; latency per request, wall time for all."""

    def client(c: int) -> None:
        for r in range(requests):
            k = c * requests + r
            start = time.monotonic()
            try:
                run.answers[k] = _post(
                    url + "/sdapi/v1/txt2img", request_body(k, seed, steps), deadline - start
                )
            except (urllib.error.URLError, OSError, ValueError) as e:
                run.failures.append(f"request {k}: {e}")
                continue
            run.latencies.append(time.monotonic() - start)

    _post(url + "/sdapi/v1/txt2img", {"prompt": "warm-up", "steps": steps}, deadline - time.monotonic())
    before = _get(url + "/gen/v1/info")["queue"]
    start = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    run.wall_s = time.monotonic() - start
    after = _get(url + "/gen/v1/info")["queue"]
    run.stats = {k: after[k] - before[k] for k in ("batches", "images")} | {
        "largest_batch": after["largest_batch"]
    }


def serve_and_load(
    max_batch: int, model, clients: int, requests: int, seed: int, steps: int, deadline: float
) -> Run:
    run = Run(max_batch)
    url, process = _start(max_batch, model, clients * requests + 1, deadline)
    try:
        load(run, url, clients, requests, seed, steps, deadline)
    finally:
        run.exit_code = stop(process, deadline)
    return run


def stop(process: subprocess.Popen, deadline: float) -> int | None:
    """SIGTERM, as an operator stops it: its exit status (None, and killed, if it does not stop in time)."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(max(5.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        process.kill()
        return None


def render_alone(model: str | None, steps: int, pairs: list[tuple[str, int]]) -> list:
    """The CLI's image for each (prompt, seed): the generation core's CLI path (load, validate, one job a batch)."""
    import numpy as np

    o = G.Options(model=model, steps=steps, guidance=5.0)
    pipe = G.load(o)
    G.validate(pipe, o)
    return [np.asarray(G.render(pipe, o, [G.Job(0, p, s)])[0].convert("RGB")) for p, s in pairs]


def twins(model: str | None, total: int, seed: int, steps: int) -> dict[int, object]:
    """The CLI's image for every request."""
    bodies = [request_body(k, seed, steps) for k in range(total)]
    return dict(enumerate(render_alone(model, steps, [(b["prompt"], b["seed"]) for b in bodies])))


def check(run: Run, expected: dict[int, object], seed: int) -> dict:
    """Lost, duplicated, and how many images equal their CLI twin (and the largest difference): bit for bit where
    the server made each alone (--max-batch 1), else within PIXEL_TOLERANCE (gen's promise for batch-mates)."""
    import numpy as np
    from PIL import Image

    from gen.generation.metadata import PIXEL_TOLERANCE

    tolerance = 0 if run.max_batch == 1 else PIXEL_TOLERANCE

    seeds, equal, worst = [], 0, 0
    for k, answer in run.answers.items():
        record_seeds = json.loads(answer["info"])["all_seeds"]
        seeds += record_seeds
        image = Image.open(io.BytesIO(base64.b64decode(answer["images"][0])))
        a, b = np.asarray(image.convert("RGB"), dtype=np.int16), expected[k].astype(np.int16)
        diff = int(np.abs(a - b).max())
        equal += diff <= tolerance and record_seeds == [seed + k]
        worst = max(worst, diff)
    return {
        "lost": len(expected) - len(set(seeds) & {seed + k for k in expected}),
        "duplicated": len(seeds) - len(set(seeds)),
        "cli_equal": equal,
        "max_pixel_diff": worst,
        "tolerance": tolerance,
    }


def percentiles(latencies: list[float]) -> dict:
    lat = sorted(latencies)
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
    return {"p50_s": round(q[49], 3) if q else None, "p95_s": round(q[94], 3) if q else None}


def summarize(run: Run, checked: dict) -> dict:
    return {
        "max_batch": run.max_batch,
        "requests": len(run.answers) + len(run.failures),
        "images": len(run.answers),
        "failures": run.failures[:5],
        **checked,
        "wall_s": round(run.wall_s, 2),
        "images_per_s": round(len(run.answers) / run.wall_s, 3) if run.wall_s else 0.0,
        **percentiles(run.latencies),
        **run.stats,
        "exit_code": run.exit_code,
    }


def benchmark(
    model: str | None = None,
    clients: int = 8,
    requests: int = 4,
    steps: int = 8,
    max_batch: int = 8,
    seed: int = 1000,
    timeout: float = 900,
) -> dict:
    """Both runs and the twins, all within `timeout` seconds; the report `format_report` prints."""
    deadline = time.monotonic() + timeout
    total = clients * requests
    runs = [serve_and_load(b, model, clients, requests, seed, steps, deadline) for b in (max_batch, 1)]
    expected = twins(model, total, seed, steps)
    rows = [summarize(run, check(run, expected, seed)) for run in runs]
    batched, single = rows
    return {
        "clients": clients,
        "requests_per_client": requests,
        "steps": steps,
        "model": model or "embedded",
        "torch_threads": os.environ.get("OMP_NUM_THREADS", "default"),
        "runs": rows,
        "speedup": round(batched["images_per_s"] / single["images_per_s"], 2)
        if single["images_per_s"]
        else None,
        "ok": all(
            r["lost"] == r["duplicated"] == 0 and r["cli_equal"] == total and r["exit_code"] == 0
            for r in rows
        ),
    }


COLUMNS = (
    ("--max-batch", "max_batch", "{}"),
    ("requests", "requests", "{}"),
    ("lost", "lost", "{}"),
    ("duplicated", "duplicated", "{}"),
    ("CLI-equal", "cli_equal", "{}"),
    ("wall s", "wall_s", "{:.1f}"),
    ("images/s", "images_per_s", "{:.2f}"),
    ("p50 s", "p50_s", "{:.2f}"),
    ("p95 s", "p95_s", "{:.2f}"),
    ("calls", "batches", "{}"),
    ("largest batch", "largest_batch", "{}"),
    ("exit", "exit_code", "{}"),
)


def format_report(report: dict) -> str:
    head = (
        f"gen bench --serve: {report['clients']} clients x {report['requests_per_client']} requests, 1 image each,"
        f" {report['steps']} steps, {report['model']} model, OMP_NUM_THREADS={report['torch_threads']}"
    )
    lines = [head, "  ".join(f"{title:>{len(title)}}" for title, _, _ in COLUMNS)]
    for row in report["runs"]:
        cells = [fmt.format(row[key]) if row[key] is not None else "-" for _, key, fmt in COLUMNS]
        lines.append(
            "  ".join(f"{cell:>{len(title)}}" for cell, (title, _, _) in zip(cells, COLUMNS, strict=True))
        )
        lines += [f"  failure: {f}" for f in row["failures"]]
    lines.append(f"batching: {report['speedup']}x the images/s of --max-batch 1")
    lines.append(
        "all images delivered once, each equal to its CLI twin (bit for bit made alone, within"
        f" {report['runs'][0]['tolerance']} level beside batch-mates; largest difference"
        f" {max(r['max_pixel_diff'] for r in report['runs'])})"
        if report["ok"]
        else "PROBLEMS: see above"
    )
    return "\n".join(lines)
