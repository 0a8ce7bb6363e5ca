"""A model's identity: the SHA-256 of its weight files, cached by path, size and modification time (PNG metadata
names the model by it; the OpenVINO backend keys its converted models by it)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from gen.files import atomic_write_text

_CHUNK = 1 << 20


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gen" / "model-hashes.json"


def model_hash(folder: str | Path) -> str:
    """SHA-256 of the model's weight files (content, in sorted order), cached by path, size and mtime."""
    folder = Path(folder).resolve()
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*.safetensors") if p.is_file())
    key = (
        str(folder)
        + "|"
        + "|".join(f"{p.relative_to(folder)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    )
    cache_path = _cache_file()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    for p in files:
        if p != folder:
            digest.update(str(p.relative_to(folder)).encode())
        with p.open("rb") as f:
            while block := f.read(_CHUNK):
                digest.update(block)
    value = digest.hexdigest()
    try:  # the cache is a convenience: a read-only home must not stop generation
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache[key] = value
        atomic_write_text(cache_path, json.dumps(cache))
    except OSError:
        pass
    return value
