"""Where images go, without ever replacing a file unasked and without half-written files.

Naming (documented in `gen --help`):
  -o out.png -n 1   -> out.png
  -o out.png -n 4   -> out-00000.png ... out-00003.png      (image k of the run is number k)
  -o DIR/           -> DIR/00000.png ...                     (a folder: an existing one, or a path ending in /)
A name already taken gets the number after the highest one already in the folder instead (unless --overwrite),
so a second run into a folder follows the first, its images in their own order.
Each PNG is written to a temporary file in the target folder and then linked into place, which fails rather
than replaces if the name was taken meanwhile (so parallel processes never clobber each other).
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from gen.files import atomic_write, fsync, temporary_sibling


class Namer:
    """Image number (None: the plain name of a single-image run) -> path; and where a run whose names are taken
    goes on: after the highest number already there (the plain name counts as 0)."""

    def __init__(self, output: str | Path):
        text = str(output)
        path = Path(output)
        if text.endswith(("/", os.sep)) or path.is_dir():
            self.folder, self.plain, self.pattern = path, None, re.compile(r"(\d{5,})\.png")
            self._name = lambda n: path / f"{n or 0:05d}.png"
        elif path.suffix.lower() != ".png":
            raise ValueError(f"output {text!r} must be a .png file or a folder (end it with / to create one)")
        else:
            self.folder, self.plain = path.parent, path
            self.pattern = re.compile(re.escape(path.stem) + r"-(\d{5,})" + re.escape(path.suffix))
            self._name = lambda n: path if n is None else path.with_name(f"{path.stem}-{n:05d}{path.suffix}")
        self._next: int | None = None  # the next number to try once names collide; scanned once

    def __call__(self, n: int | None) -> Path:
        return self._name(n)

    def free(self) -> Iterator[Path]:
        """Candidates for an image whose own name is taken, in increasing number."""
        if self._next is None:
            self._next = self._highest() + 1
        while True:
            yield self._name(self._next)
            self._next += 1

    def _highest(self) -> int:
        numbers = [0] if self.plain is not None and self.plain.exists() else []
        try:
            names = os.listdir(self.folder)
        except OSError:
            names = []
        numbers += [int(m.group(1)) for m in map(self.pattern.fullmatch, names) if m]
        return max(numbers, default=-1)


def namer(output: str | Path, total: int = 1) -> Namer:
    """A Namer for `output` (`total` is kept for callers; the naming does not depend on it)."""
    return Namer(output)


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
    """Write image k atomically under its name, or, if that is taken, the number after the highest one there
    (a plain function as `name`: the next free number from `total`); return the path."""
    first = name(None if total == 1 else k)
    first.parent.mkdir(parents=True, exist_ok=True)
    if overwrite:
        with atomic_write(first) as tmp:
            image.save(tmp, format="PNG", pnginfo=pnginfo)
        return first
    with temporary_sibling(first) as tmp:
        image.save(tmp, format="PNG", pnginfo=pnginfo)
        fsync(tmp)
        rest = name.free() if isinstance(name, Namer) else (name(n) for n in itertools.count(max(total, 1)))
        for candidate in itertools.chain([first], rest):
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
