"""Writing files and folders so that no reader, crash or power cut ever sees a half-written one.

The one place gen does this; the library, the CLI and the training scripts all call it. A result is written
under a unique temporary name in its destination folder (same filesystem, so the final rename is atomic),
flushed to disk, then renamed into place; on any error the temporary is removed and an existing file is left
as it was. Temporary names are `.<name>.<random>.tmp`, so parallel writers never share one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def _default_mode(directory: bool) -> int:
    # mkstemp/mkdtemp create 0600/0700; results should get the permissions any new file would.
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def fsync(path: Path) -> None:
    """Flush a written file's contents to disk (before a rename makes it visible under its real name)."""
    with open(path, "rb+") as f:  # writable: Windows cannot sync a read-only handle
        os.fsync(f.fileno())


@contextlib.contextmanager
def temporary_sibling(path: str | Path) -> Iterator[Path]:
    """A new, empty, uniquely named file next to `path`, with a new file's usual permissions; removed on exit
    unless the caller has renamed it away. For callers that put it in place themselves (see gen.cli.outputs)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, _default_mode(directory=False))
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Write to the yielded temporary path; when the block ends without an error it becomes `path`.

        with atomic_write(out / "model.safetensors") as tmp:
            save_file(state, str(tmp))

    An error inside the block leaves `path` untouched (old contents, or still absent) and no temporary behind.
    Writers that pick a format from the suffix need it spelled out: the temporary ends in `.tmp`.
    """
    path = Path(path)
    with temporary_sibling(path) as tmp:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def atomic_folder(dest: str | Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """`write(tmp)` fills a temporary sibling folder; its files are synced, then one rename makes it `dest`.

    An existing `dest` is kept unless overwrite=True, in which case it is replaced only after the new one is
    complete.
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists; refusing to overwrite it (pass overwrite=True)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    os.chmod(tmp, _default_mode(directory=True))
    try:
        write(tmp)
        for p in tmp.rglob("*"):
            if p.is_file() and not p.is_symlink():
                fsync(p)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old.tmp")  # .tmp: a leftover looks like any other temporary
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
