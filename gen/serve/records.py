"""What the job store keeps of a native job: a JobRecord (with its finished images and init pictures), and the
JobStore interface each store implements (gen.serve.store's MemoryStore, gen.serve.sqlite_store's SqliteStore).
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    control: list[bytes] | None = None  # the ControlNet units' pictures (PNG), in unit order

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
