"""What `gen serve` was started with. Torch- and FastAPI-free: the CLI builds and checks it before loading."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path


def default_state_dir() -> Path:
    """Where `gen serve` keeps its jobs unless told otherwise: the user's cache, as the model-hash cache."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gen" / "serve"


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 7860
    models: list[str | None] = field(
        default_factory=lambda: [None]
    )  # None: the embedded model; first: default
    device: str = "cpu"
    dtype: str = "fp32"
    attention: str = "sdpa"
    api_auth: str | None = None  # "user:pass[,user2:pass2]": HTTP Basic on every route
    api_key: str | None = None  # Bearer token on /v1 (the OpenAI API)
    cors: list[str] = field(default_factory=list)  # allowed origins; none: CORS off
    max_batch: int = 8  # images in one pipeline call
    batch_wait_ms: float = (
        25.0  # after a batch, how long to wait for compatible requests to fill the next one
    )
    max_queue: int = 64  # requests waiting; one more is answered 429
    max_pixels: int = 1024 * 1024  # width x height of one image
    max_steps: int = 150
    max_images: int = 16  # images in one request (batch_size x n_iter, n)
    max_body: int = 8 * 2**20  # bytes in one request body
    max_prompt: int = 20_000  # characters in one prompt
    # Native jobs: stored here (SQLite + PNG files) to survive a crash; None keeps them in memory only. None
    # is the library's default (tests, embedding); `gen serve` defaults to default_state_dir().
    state_dir: str | None = None
    keep_hours: float = 24.0  # finished native jobs stay fetchable this long (--keep-jobs HOURS)
    # Finished jobs held in memory, at most this many, with at most this much of PNGs; beyond, the oldest are
    # dropped from memory (read back from the store when asked for; without a store they are forgotten).
    keep_jobs: int = 256
    keep_bytes: int = 256 * 2**20

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
