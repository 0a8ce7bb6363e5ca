"""The installed `gen` as a person runs it: in a terminal, where tqdm draws its progress bar (a non-tty stderr, as
in every other test, hides the bar and with it a crash the README's first command once had)."""

import fcntl
import os
import pty
import select
import shutil
import struct
import subprocess
import termios
import time

import numpy as np
import pytest
from PIL import Image

STEPS = ["--steps", "3"]


def in_terminal(argv: list[str], cwd, timeout: float = 300.0) -> tuple[int, str]:
    """Run argv with stdin, stdout and stderr on a new pseudo-terminal; (exit status, everything it wrote)."""
    exe = shutil.which("gen")
    assert exe, "the gen console script is not installed"
    leader, follower = pty.openpty()
    # A terminal window's size, as a person's terminal has (a bare pty is 0x0, and tqdm then draws nothing)
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TERM": "xterm", "COLUMNS": "100", "LINES": "30"}
    process = subprocess.Popen(
        [exe, *argv], stdin=follower, stdout=follower, stderr=follower, cwd=cwd, env=env, close_fds=True
    )
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        status = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
        os.close(leader)
    return status, b"".join(chunks).decode("utf-8", "replace")


def assert_ran_with_a_bar(status: int, output: str) -> None:
    assert status == 0, output[-2000:]
    assert "Traceback" not in output, output[-2000:]
    assert "step" in output and "\r" in output, output[-2000:]  # tqdm drew (and redrew) its bar


def test_readme_first_command_in_a_terminal(tmp_path):
    status, output = in_terminal(
        ["a red circle on a blue background", "-o", "a.png", "--seed", "1", *STEPS], tmp_path
    )
    assert_ran_with_a_bar(status, output)
    assert Image.open(tmp_path / "a.png").size == (64, 64)
    assert "a.png" in output


def test_img2img_and_inpaint_in_a_terminal(tmp_path):
    picture = np.zeros((64, 64, 3), np.uint8)
    picture[16:48, 16:48] = (200, 30, 30)
    Image.fromarray(picture).save(tmp_path / "in.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[:32] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    status, output = in_terminal(
        ["a green square", "--init-image", "in.png", "-o", "i.png", *STEPS], tmp_path
    )
    assert_ran_with_a_bar(status, output)
    assert (tmp_path / "i.png").exists()
    argv = ["a yellow star", "--init-image", "in.png", "--mask", "mask.png", "-o", "m.png", *STEPS]
    status, output = in_terminal(argv, tmp_path)
    assert_ran_with_a_bar(status, output)
    assert (tmp_path / "m.png").exists()


def test_from_file_in_a_terminal(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n# a comment, not a prompt\n\na blue star\n")
    status, output = in_terminal(
        ["--from-file", "p.txt", "--batch-size", "2", "-o", "out/", *STEPS], tmp_path
    )
    assert_ran_with_a_bar(status, output)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000.png", "00001.png"]


@pytest.mark.slow
def test_eval_in_a_terminal(tmp_path):
    argv = ["eval", "--task", "img2img", "--count", "2", "--steps", "10"]
    status, output = in_terminal(argv, tmp_path)
    assert status == 0 and "Traceback" not in output, output[-2000:]
    assert "strength" in output.lower()
