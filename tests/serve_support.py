"""Real servers for the serve tests: uvicorn on a free 127.0.0.1 port, run in a thread of the test process with
models loaded once per session, or `gen serve` as its own process where signals matter."""

from __future__ import annotations

import base64
import functools
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from tests.images import pixels  # noqa: F401 (the serve tests import it from here)

PROMPT = "a red circle on a blue background"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.lru_cache(maxsize=1)
def shared_models():
    """The embedded model (default) and a tiny random one named "tiny", loaded once for every in-process server."""
    from gen.serve.models import Models
    from tests import components

    folder = Path(tempfile.mkdtemp(prefix="gen-serve-")) / "tiny"
    tokenizer = components.write_tokenizer(folder.parent / "tokenizer")
    components.pipeline(tokenizer).save_pretrained(folder)
    return Models.load([None, str(folder)], device="cpu", dtype="fp32", attention="sdpa")


@dataclass
class Running:
    url: str
    state: object  # gen.serve.state.State

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 120), **kw)


@contextmanager
def serving(models=None, **config):
    """A real uvicorn server on the shared models (or `models`); stopped as SIGTERM would stop it."""
    import uvicorn

    from gen.serve.app import Server, create_app
    from gen.serve.config import ServeConfig

    port = free_port()
    app = create_app(ServeConfig(port=port, **config), models or shared_models())
    server = Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"), app.state.gen)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield Running(f"http://127.0.0.1:{port}", app.state.gen)
    finally:
        server.handle_exit(signal.SIGTERM, None)
        thread.join(60)
        assert not thread.is_alive(), "server did not stop"


@contextmanager
def gen_serve_process(*args: str):
    """`gen serve` in its own process (python -m gen), ready when it answers; yields (url, process)."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "gen", "serve", "--port", str(port), *args]
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)


def wait_ready(url: str, process, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"gen serve exited {process.returncode}: {process.stdout.read()[-2000:]}")
        try:
            if httpx.get(url + "/gen/v1/info", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("gen serve did not become ready")


def png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def cli_image(tmp_path: Path, prompt: str, seed: int, *args: str) -> np.ndarray:
    """The image `gen PROMPT --seed SEED ARGS` writes (the CLI itself, in this process)."""
    from gen.cli import main

    out = tmp_path / f"cli-{seed}-{abs(hash((prompt, args))) % 10**8}.png"
    assert main([prompt, "-o", str(out), "--seed", str(seed), "--quiet", "--overwrite", *args]) == 0
    return pixels(out)


def wait_until(condition, timeout: float = 30, every: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(every)


def init_pictures(folder: Path) -> tuple[Image.Image, Image.Image]:
    """An init image (a red disc on blue, 64x48) and a mask over its left part, also saved as in.png and
    mask.png in `folder`, for the img2img and inpainting tests."""
    from PIL import ImageDraw

    image = Image.new("RGB", (64, 48), (20, 40, 200))
    ImageDraw.Draw(image).ellipse([8, 8, 40, 40], fill=(220, 30, 30))
    mask = Image.new("L", (64, 48), 0)
    ImageDraw.Draw(mask).rectangle([4, 4, 44, 44], fill=255)
    image.save(folder / "in.png")
    mask.save(folder / "mask.png")
    return image, mask
