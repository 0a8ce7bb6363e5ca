"""Where images go, without ever replacing a file unasked and without half-written files.

Naming (documented in `gen --help`):
  -o out.png -n 1   -> out.png
  -o out.png -n 4   -> out-00000.png ... out-00003.png      (image k of the run is number k)
  -o DIR/           -> DIR/00000.png ...                     (a folder: an existing one, or a path ending in /)
A name already taken gets the next free number at or above the run's size instead, unless --overwrite.
Each PNG is written to a temporary file in the target folder and then linked into place, which fails rather
than replaces if the name was taken meanwhile (so parallel processes never clobber each other).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path

from gen.files import atomic_write, fsync, temporary_sibling


def namer(output: str | Path, total: int) -> Callable[[int | None], Path]:
    """A function from image number (None: the plain name of a single-image run) to a path."""
    text = str(output)
    path = Path(output)
    if text.endswith(("/", os.sep)) or path.is_dir():
        return lambda n: path / f"{n or 0:05d}.png"
    if path.suffix.lower() != ".png":
        raise ValueError(f"output {text!r} must be a .png file or a folder (end it with / to create one)")
    return lambda n: path if n is None else path.with_name(f"{path.stem}-{n:05d}{path.suffix}")


def check_writable(output: str | Path) -> None:
    """Fail early, before any model work, if the output folder cannot be created or written."""
    path = Path(output)
    folder = path if (str(output).endswith(("/", os.sep)) or path.is_dir()) else path.parent
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write to {str(folder) or '.'!r}: {existing} is not a writable folder")


def save(
    image, name: Callable[[int | None], Path], k: int, total: int, overwrite: bool, pnginfo=None
) -> Path:
    """Write image k atomically under its name, or the next free number if that is taken; return the path."""
    first = name(None if total == 1 else k)
    first.parent.mkdir(parents=True, exist_ok=True)
    if overwrite:
        with atomic_write(first) as tmp:
            image.save(tmp, format="PNG", pnginfo=pnginfo)
        return first
    with temporary_sibling(first) as tmp:
        image.save(tmp, format="PNG", pnginfo=pnginfo)
        fsync(tmp)
        for candidate in itertools.chain([first], (name(n) for n in itertools.count(max(total, 1)))):
            if _link(tmp, candidate):
                return candidate
    raise AssertionError("unreachable")


def _link(src: Path, dest: Path) -> bool:
    try:
        os.link(src, dest)
        return True
    except FileExistsError:
        return False
    except OSError:  # filesystems without hard links: exclusive create, then replace (tiny race window)
        try:
            fd = os.open(dest, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        os.replace(src, dest)
        return True
