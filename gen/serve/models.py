"""The models a server serves: each loaded once at start, named and hashed as the PNG metadata names them, and
titled as A1111 lists checkpoints ("name [hash10]") so its clients can pick one."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gen import generation as G
from gen.diffusion.samplers import samplers_for
from gen.generation import metadata
from gen.loading.assets import model_folder
from gen.loading.pipeline import base_for, flow_file

logger = logging.getLogger(__name__)


@dataclass
class ServedModel:
    path: str | None  # as recorded in each PNG's options (absolute), None for the embedded model
    name: str  # the PNG metadata's "Model"
    sha256: str  # the PNG metadata's model hash
    pipe: Any = field(repr=False)
    scheduler: Any = field(repr=False)  # the model's own: for requests that name no sampler
    # an SD3/Flux transformer file's other parts, as request fields: "base" (its folder), "text_encoder" and "vae"
    # (part files), absolute; empty for every other model
    parts: dict = field(default_factory=dict)

    def pipeline(self, sampler: str | None, init=None) -> Any:
        """The pipeline for a request's task (text, image-to-image, inpainting: from `init`) and sampler, sharing
        the loaded weights, made once (gen.generation.core.pipeline_for): no scheduler swapped on the shared
        pipe, no from_pipe per batch."""
        return G.pipeline_for(self.pipe, G.task_of(init), sampler)

    @property
    def hash(self) -> str:
        return self.sha256[:10]

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]"

    @property
    def default_size(self) -> int:
        return self.pipe.default_size

    @property
    def samplers(self) -> list[str]:
        """The sampler names this model runs (SD3/Flux and the others take different sets)."""
        return samplers_for(self.scheduler.config)

    def a1111(self) -> dict:
        return {
            "title": self.title,
            "model_name": self.name,
            "hash": self.hash,
            "sha256": self.sha256,
            "filename": str(model_folder(self.path)),
            "config": None,
        }


def load_model(
    path: str | None,
    device: str,
    dtype: str,
    attention: str,
    backend: str = "torch",
    bases: list[str] = (),
    part_files: list[str] = (),
    vae: str | None = None,
) -> ServedModel:
    """One served model; an SD3/Flux transformer file gets the first of `bases` that fits it and the part files
    (`part_files`: text encoders; `vae`) given, all recorded in each PNG's options, so `gen reproduce` finds them."""
    folder = model_folder(path).resolve()
    base = base_for(path, list(bases))
    flow = flow_file(path) is not None
    parts = {
        "base": str(Path(base).resolve()) if base is not None else None,
        "text_encoder": [str(Path(f).resolve()) for f in part_files] if flow else [],
        "vae": str(Path(vae).resolve()) if flow and vae is not None else None,
    }
    o = G.Options(
        model=str(folder) if path is not None else None,
        **parts,
        device=device,
        dtype=dtype,
        attention=attention,
        backend=backend,
    )
    G.check_options(o)
    pipe = G.load(o)
    logger.info("loaded %s", folder)
    used = {k: v for k, v in parts.items() if v}
    return ServedModel(o.model, folder.stem, metadata.model_hash(folder), pipe, pipe.scheduler, used)


def check_part_flags(paths: list[str | None]) -> None:
    """--text-encoder/--vae go to every SD3/Flux transformer file served: refused where there is none, or where
    files of both families would each take the other's parts (an SD3 and a Flux VAE cannot be told apart)."""
    families = {family for p in paths if (family := flow_file(p)) is not None}
    if not families:
        raise ValueError("--text-encoder and --vae are for SD3/Flux transformer files; no --model is one")
    if len(families) > 1:
        raise ValueError(
            "--text-encoder and --vae would go to both the SD3 and the Flux files among --model; serve each family"
            " from its own server, or use files that carry their parts or --base folders"
        )


class Models:
    """The served models; the first is the default."""

    def __init__(self, models: list[ServedModel]):
        titles = [m.title for m in models]
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"two models share a name: {names}; give each folder its own name")
        self.all, self.default = models, models[0]
        self._titles = titles

    @classmethod
    def load(
        cls,
        paths: list[str | None],
        device: str,
        dtype: str,
        attention: str,
        backend: str = "torch",
        bases: list[str] = (),
        part_files: list[str] = (),
        vae: str | None = None,
    ) -> Models:
        if part_files or vae:
            check_part_flags(paths)
        return cls([load_model(p, device, dtype, attention, backend, bases, part_files, vae) for p in paths])

    def __iter__(self):
        return iter(self.all)

    def find(self, name: str | None) -> ServedModel:
        """By title, name, file name or hash (A1111 clients send any of these), case-insensitively; None: the
        default. ValueError naming the served titles."""
        if name is None or not str(name).strip():
            return self.default
        key = str(name).strip().lower()
        for m in self.all:
            folder = model_folder(m.path)
            if key in (m.title.lower(), m.name.lower(), folder.name.lower(), m.hash, m.sha256):
                return m
        raise ValueError(f"model {name!r} is not served here; choose one of: {', '.join(self._titles)}")


def short_hash(path: Path) -> str:
    """A1111's old short model hash (sd_models.model_hash, which the extension's model names carry): SHA-256 of
    the 64 KiB from 1 MiB into the file, first 8 hex digits."""
    with path.open("rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def find_controlnets(folder: str | None) -> dict[str, str]:
    """ "name [hash]" -> path for each ControlNet in `folder`: original-layout files (.safetensors; .pth/.ckpt
    need --allow-pickle elsewhere) and diffusers folders (a config.json), named by their file or folder stem."""
    if folder is None:
        return {}
    found = {}
    for path in sorted(Path(folder).iterdir()):
        if path.is_dir() and (path / "config.json").is_file():
            weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
            if weights:
                found[f"{path.name} [{short_hash(weights[0])}]"] = str(path.resolve())
        elif path.suffix.lower() in (".safetensors", ".pth", ".ckpt", ".bin"):
            found[f"{path.stem} [{short_hash(path)}]"] = str(path.resolve())
    return found
