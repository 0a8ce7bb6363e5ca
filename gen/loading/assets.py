"""Where the embedded default model lives. Torch-free: the PNG records, the server's model list and the CLI
resolve it without loading anything."""

from __future__ import annotations

from pathlib import Path

# The embedded default model ships inside the package (see gen.train.shapes for how it is made).
DEFAULT_MODEL = Path(__file__).parents[1] / "assets" / "shapes"  # gen/assets/shapes


def model_folder(path: str | Path | None) -> Path:
    """Where a model given as `path` lives: the path, or the embedded model's folder for None (the one place
    the default model is resolved: loading, PNG records, the server's model list, `gen prompt`, eval)."""
    return Path(path) if path is not None else DEFAULT_MODEL
