"""What `gen serve` was started with. Torch- and FastAPI-free: the CLI builds and checks it before loading."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    keep_jobs: int = 256  # finished native jobs kept for GET /gen/v1/jobs/{id} ...
    keep_bytes: int = 256 * 2**20  # ... and at most this much of their PNGs

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
        if not 0 <= self.batch_wait_ms <= 10_000:
            raise ValueError(f"--batch-wait-ms {self.batch_wait_ms} must be between 0 and 10000")
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port {self.port} must be between 0 and 65535")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api-key must not be empty")
        self.credentials()
