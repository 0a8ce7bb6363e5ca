"""Checkpoints that survive anything: written into a temporary folder, manifest last, promoted with one rename.

A folder `checkpoint-<step>` is complete exactly when it holds `manifest.json`; `latest()` ignores anything else,
so a run killed mid-save (SIGKILL, power loss, disk full) resumes from the previous complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import torch

from gen.files import atomic_folder

logger = logging.getLogger(__name__)
PATTERN = re.compile(r"^checkpoint-(\d+)$")


def save(output_dir: Path, step: int, state: dict, total_limit: int | None = None) -> Path:
    """Write `state` (tensors, numbers, nested dicts) as OUTPUT/checkpoint-<step>; keep the newest `total_limit`."""

    def write(tmp: Path) -> None:
        with open(tmp / "state.pt", "wb") as f:
            torch.save(state, f)
        manifest = {"step": step, "files": ["state.pt"], "bytes": (tmp / "state.pt").stat().st_size}
        (tmp / "manifest.json").write_text(json.dumps(manifest))  # its presence marks the checkpoint complete

    # Temporary folders are `.checkpoint-<step>.<random>.tmp` (clean_stale's pattern); an existing folder of
    # the same step is a stale, incomplete one from a killed run, and is replaced.
    final = atomic_folder(output_dir / f"checkpoint-{step}", write, overwrite=True)
    if total_limit:
        for old in complete(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def clean_stale(output_dir: Path) -> None:
    """Remove temporary folders a killed run left behind (they were never promoted, so nothing is lost)."""
    if output_dir.is_dir():
        for p in output_dir.glob(".checkpoint-*.tmp"):
            shutil.rmtree(p, ignore_errors=True)


def complete(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = PATTERN.match(p.name)
        if m and (p / "manifest.json").is_file():
            try:
                manifest = json.loads((p / "manifest.json").read_text())
            except ValueError:
                continue
            if (p / "state.pt").is_file() and (p / "state.pt").stat().st_size == manifest.get("bytes"):
                found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve(output_dir: Path, resume: str | None) -> Path | None:
    """`--resume latest` (newest complete checkpoint, or None to start fresh) or a checkpoint folder path."""
    if not resume:
        return None
    if resume == "latest":
        found = complete(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "manifest.json").is_file():
        raise ValueError(f"--resume {resume}: not a complete checkpoint folder (no manifest.json)")
    return path


def load(path: Path, device="cpu") -> dict:
    return torch.load(path / "state.pt", map_location=device, weights_only=True)
