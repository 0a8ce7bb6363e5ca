"""What `gen serve` was started with. Torch- and FastAPI-free: the CLI builds and checks it before loading."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from gen.generation.fields import option
from gen.generation.options import ATTENTION, PRECISIONS
from gen.loading.precision import BACKENDS, pick_precision


def default_state_dir() -> Path:
    """Where `gen serve` keeps its jobs unless told otherwise: the user's cache, as the model-hash cache."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gen" / "serve"


def _mib(text: str) -> int:
    """--max-body-mb's MiB as bytes."""
    return int(float(text) * 2**20)


def _state_dir(text: str) -> str | None:
    """--state-dir DIR, or none: memory only."""
    return None if text.strip().lower() == "none" else text


@dataclass
class ServeConfig:
    """What `gen serve` was started with; its flags are made from these fields (gen.cli.flags)."""

    host: str = option("127.0.0.1", "address to listen on (this machine only by default)")
    port: int = option(7860, "port to listen on")
    # None: the embedded model; the first is the default
    models: list[str | None] = option(
        [None], "model folder or file; repeat to serve several (first: default)", flags=("--model",)
    )
    bases: list[str] = option(
        [],
        "with SD3/Flux transformer files among --model: diffusers folders of those models, their VAE, text"
        " encoders and tokenizers (each file takes the first folder that fits it; repeatable)",
        flags=("--base",),
        metavar="DIR",
    )
    text_encoders: list[str] = option(
        [],
        "with SD3/Flux transformer files among --model (of one family): text encoder files or folders (ComfyUI's"
        " clip_l, clip_g, t5xxl; told apart by their weights) each such file takes (repeatable)",
        flags=("--text-encoder",),
        metavar="PATH",
    )
    vae: str | None = option(
        None,
        "with SD3/Flux transformer files among --model (of one family): the VAE file or folder each such file takes"
        " (e.g. Flux's ae.safetensors)",
        metavar="PATH",
    )
    device: str = option("cpu", "cpu, cuda, cuda:1, ... one worker per device")
    controlnet_dir: str | None = option(
        None,
        "ControlNets to serve (A1111's models/ControlNet): original-layout files and diffusers folders in DIR",
        metavar="DIR",
    )
    dtype: str = option(
        "auto",
        "precision; auto: bf16 where the device has native bf16, else fp32 (logged)",
        choices=PRECISIONS,
    )
    attention: str = option("sdpa", "attention kernels", choices=ATTENTION)
    backend: str = option(
        "torch",
        "what runs the denoiser and VAE: torch, or openvino (CPU; pip install 'gen[openvino]')",
        choices=BACKENDS,
    )
    api_auth: str | None = option(
        None, "HTTP Basic on every route (default: $GEN_API_AUTH, else none)", metavar="USER:PASS[,U2:P2]"
    )
    api_key: str | None = option(
        None, "Bearer key for /v1, the OpenAI API (default: $GEN_API_KEY, else none)"
    )
    cors: list[str] = option([], "allow browser calls from ORIGIN (repeatable)", metavar="ORIGIN")
    max_batch: int = option(8, "images in one pipeline call")
    batch_wait_ms: float = option(
        25.0, "after a batch, wait this long for compatible requests to fill the next"
    )
    max_queue: int = option(64, "requests waiting before 429")
    max_pixels: int = option(1024 * 1024, "width x height of an image")
    max_steps: int = option(150, "sampling steps of a request")
    max_images: int = option(16, "images in one request (batch_size x n_iter, n)")
    max_body: int = option(
        8 * 2**20, "request body size in MiB", flags=("--max-body-mb",), parse=_mib, metavar="MIB"
    )
    max_prompt: int = option(20_000, "characters in one prompt", cli=False)
    # Native jobs: stored here (SQLite + PNG files) to survive a crash; None keeps them in memory only. None
    # is the library's default (tests, embedding); `gen serve` defaults to default_state_dir().
    state_dir: str | None = option(
        None,
        "store jobs of /gen/v1/jobs here (SQLite + PNGs), so a restart or crash resumes them; none: memory only",
        metavar="DIR",
        parse=_state_dir,
    )
    keep_hours: float = option(
        24.0,
        "finished jobs stay fetchable this long, then are deleted",
        flags=("--keep-jobs",),
        metavar="HOURS",
    )
    # Finished jobs held in memory, at most this many, with at most this much of PNGs; beyond, the oldest are
    # dropped from memory (read back from the store when asked for; without a store they are forgotten).
    keep_jobs: int = option(256, "finished jobs held in memory", cli=False)
    keep_bytes: int = option(256 * 2**20, "bytes of finished jobs' PNGs held in memory", cli=False)

    @staticmethod
    def command_line_defaults() -> dict:
        """Where `gen serve`'s defaults differ from the library's: credentials from the environment, jobs kept
        in the user's cache, the body limit shown in MiB (argparse parses string defaults with the flag's type)."""
        return {
            "api_auth": os.environ.get("GEN_API_AUTH"),
            "api_key": os.environ.get("GEN_API_KEY"),
            "state_dir": str(default_state_dir()),
            "max_body": str(ServeConfig.max_body / 2**20),
        }

    def resolve_precision(self) -> str | None:
        """--dtype auto made the precision it picks on --device (gen.loading.precision.pick_precision), once at
        startup: every request, job and PNG then carries what runs. Returns why auto chose it (None if named)."""
        self.dtype, why = pick_precision(self.dtype, self.device, self.backend)
        return why

    def credentials(self) -> list[tuple[str, str]]:
        """--api-auth as (user, password) pairs; ValueError naming a malformed entry."""
        if not self.api_auth:
            return []
        pairs = []
        for entry in self.api_auth.split(","):
            user, sep, password = entry.partition(":")
            if not sep or not user or not password:
                raise ValueError(f"--api-auth entry {entry!r} must be user:password (several: u1:p1,u2:p2)")
            pairs.append((user, password))
        return pairs

    def check(self) -> None:
        for name in ("max_batch", "max_queue", "max_pixels", "max_steps", "max_images", "max_body"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} {value!r} must be an integer >= 1")
        self._check_jobs()
        if not 0 <= self.batch_wait_ms <= 10_000:
            raise ValueError(f"--batch-wait-ms {self.batch_wait_ms} must be between 0 and 10000")
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port {self.port} must be between 0 and 65535")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api-key must not be empty")
        self.credentials()
        if self.controlnet_dir is not None and not Path(self.controlnet_dir).is_dir():
            raise ValueError(f"--controlnet-dir {self.controlnet_dir}: no such folder")

    def _check_jobs(self) -> None:
        """The native jobs' store and how long finished ones are kept."""
        for name in ("keep_jobs", "keep_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name.replace('_', '-')} {value!r} must be an integer >= 0")
        hours = self.keep_hours
        if not isinstance(hours, (int, float)) or not math.isfinite(hours) or hours <= 0:
            raise ValueError(f"--keep-jobs {hours!r} must be a number of hours > 0")
        if self.state_dir is not None and not str(self.state_dir).strip():
            raise ValueError("--state-dir must not be empty (none: memory only)")
        folder = None if self.state_dir is None else Path(self.state_dir)
        if folder is not None and folder.exists() and not folder.is_dir():
            raise ValueError(f"--state-dir {folder} is a file; give a folder (or none: memory only)")
