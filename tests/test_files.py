import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from gen import files
from gen.files import atomic_folder, atomic_write, atomic_write_text
from gen.pixels import contact_sheet

ROOT = Path(__file__).resolve().parents[1]


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_atomic_write_replaces_the_file_with_a_new_files_permissions(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")
    with atomic_write(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".a.json.") and tmp.suffix == ".tmp"
        tmp.write_text("new")
        assert path.read_text() == "old"  # nothing visible until the block ends
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not mkstemp's 0600


def test_a_failure_mid_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old weights")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(path) as tmp:
            tmp.write_bytes(b"half of the new")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old weights"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    with pytest.raises(RuntimeError):
        with atomic_write(tmp_path / "new.png"):
            raise RuntimeError("interrupted")
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no empty new.png either


def test_a_failed_rename_leaves_no_temporary(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise PermissionError("read-only")

    monkeypatch.setattr(files.os, "replace", refuse)
    with pytest.raises(PermissionError):
        atomic_write_text(tmp_path / "a.txt", "x")
    assert list(tmp_path.iterdir()) == []


def test_temporary_names_are_unique(tmp_path):
    # Two writers of the same file (threads, processes, a retry) never share a temporary.
    path = tmp_path / "cache.json"
    with atomic_write(path) as a, atomic_write(path) as b:
        assert a != b and a.exists() and b.exists()
        a.write_text("a")
        b.write_text("b")
    assert path.read_text() == "a"  # the last to finish wins, whole
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"]


def test_atomic_folder_replaces_only_a_complete_folder(tmp_path):
    dest = tmp_path / "model"
    atomic_folder(dest, lambda tmp: (tmp / "weights").write_text("v1"))
    with pytest.raises(FileExistsError):
        atomic_folder(dest, lambda tmp: None)

    def broken(tmp):
        (tmp / "weights").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_folder(dest, broken, overwrite=True)
    assert (dest / "weights").read_text() == "v1"
    atomic_folder(dest, lambda tmp: (tmp / "weights").write_text("v2"), overwrite=True)
    assert (dest / "weights").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_contact_sheet_rows_and_white_padding():
    colours = ["red", "green", "blue"]
    sheet = contact_sheet([Image.new("RGB", (4, 3), c) for c in colours], columns=2)
    assert sheet.size == (8, 6)
    corners = [sheet.getpixel(xy) for xy in [(0, 0), (4, 0), (0, 3), (4, 3)]]
    assert corners == [(255, 0, 0), (0, 128, 0), (0, 0, 255), (255, 255, 255)]
    assert contact_sheet([Image.new("RGB", (4, 3))] * 10).size == (8 * 4, 2 * 3)  # at most 8 columns


def test_training_never_imports_the_command():
    # The CLI is a front-end on the library; training shares the library, not the CLI's run loop.
    mods = ["gen.train.trainer", "gen.train.text_to_image", "gen.train.dreambooth", "gen.train.shapes"]
    code = f"import sys; [__import__(m) for m in {mods}]; print([m for m in ('gen.cli.loop', 'gen.cli') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["[]"]
    for script in (ROOT / "train").glob("*.py"):  # the lazy imports inside functions too
        text = script.read_text()
        assert "gen.cli.loop" not in text and "gen.cli" not in text and "from gen import run" not in text, (
            script
        )


def test_a_second_run_into_a_folder_follows_the_first_in_order(tmp_path):
    from gen.cli import outputs

    image = Image.new("RGB", (4, 4))
    for k in range(4):
        outputs.save(image, outputs.namer(f"{tmp_path}/out/"), k=k, total=4, overwrite=False)
    name = outputs.namer(f"{tmp_path}/out/")
    paths = [outputs.save(image, name, k=k, total=6, overwrite=False).name for k in range(6)]
    assert paths == [f"{n:05d}.png" for n in range(4, 10)]  # image k of the second run is number 4 + k
    single = outputs.namer(tmp_path / "a.png")
    assert [outputs.save(image, single, k=0, total=1, overwrite=False).name for _ in range(3)] == [
        "a.png",
        "a-00001.png",
        "a-00002.png",
    ]
