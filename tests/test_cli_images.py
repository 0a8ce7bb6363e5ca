"""`gen --init-image` (image-to-image) and `--mask` (inpainting) through main(argv) and the installed command:
sizes from the init image, A1111's metadata keys, `gen reproduce --verify` with the inputs given again,
the original kept outside the mask, and bad input as one line with exit status 2."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image, ImageDraw

from gen.cli import main
from gen.generation import metadata
from tests.images import assert_same_image, pixels

STEPS = ["--steps", "6"]


@pytest.fixture
def scene(tmp_path):
    """An 80x48 picture (a red disc on blue) and a mask over its left half's middle."""
    image = Image.new("RGB", (80, 48), (20, 40, 200))
    ImageDraw.Draw(image).ellipse([8, 8, 40, 40], fill=(220, 30, 30))
    image.save(tmp_path / "in.png")
    mask = Image.new("L", (80, 48), 0)
    ImageDraw.Draw(mask).rectangle([4, 4, 44, 44], fill=255)
    mask.save(tmp_path / "mask.png")
    return tmp_path / "in.png", tmp_path / "mask.png"


def run(tmp_path, capsys, *argv) -> int:
    code = main([*STEPS, *argv])
    capsys.readouterr()
    return code


def test_img2img_size_metadata_and_reproduce(tmp_path, capsys, scene):
    init, _ = scene
    out = tmp_path / "out.png"
    assert (
        run(
            tmp_path,
            capsys,
            "a green square",
            "--init-image",
            str(init),
            "--strength",
            "0.5",
            "--seed",
            "3",
            "-o",
            str(out),
        )
        == 0
    )
    image = Image.open(out)
    assert image.size == (80, 48)  # the init image's
    assert (
        "Denoising strength: 0.5" in image.text["parameters"] and "Mask blur" not in image.text["parameters"]
    )
    record = json.loads(image.text["gen"])
    assert record["options"]["init_image"] == str(init) and len(record["init_image_hash"]) == 64
    moved = tmp_path / "moved.png"
    shutil.move(init, moved)
    assert main(["reproduce", str(out), "--verify", "--init-image", str(moved)]) == 0
    assert "max pixel difference: 0" in capsys.readouterr().out


def test_reproduce_refuses_another_init_image(tmp_path, capsys, scene):
    init, _ = scene
    out = tmp_path / "out.png"
    assert (
        run(tmp_path, capsys, "a green square", "--init-image", str(init), "--seed", "3", "-o", str(out)) == 0
    )
    other = tmp_path / "other.png"
    Image.new("RGB", (80, 48), "white").save(other)
    assert main(["reproduce", str(out), "--verify", "--init-image", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"init image {other} is not the one {out} was made from" in err and err.count("\n") == 1


def test_strength_changes_how_much_is_redrawn(tmp_path, capsys, scene):
    init, _ = scene
    diffs = []
    for strength in ("0.2", "1.0"):
        out = tmp_path / f"s{strength}.png"
        assert (
            run(
                tmp_path,
                capsys,
                "a white star on a green background",
                "--init-image",
                str(init),
                "--strength",
                strength,
                "--seed",
                "1",
                "-o",
                str(out),
            )
            == 0
        )
        diffs.append(np.abs(pixels(out).astype(int) - pixels(init).astype(int)).mean())
    assert (
        diffs[0] * 3 < diffs[1]
    )  # low strength keeps the picture (measured 28 vs 104); full strength repaints


def test_inpaint_keeps_the_original_outside_the_mask(tmp_path, capsys, scene):
    init, mask = scene
    out = tmp_path / "out.png"
    argv = [
        "a yellow star on a blue background",
        "--init-image",
        str(init),
        "--mask",
        str(mask),
        "--mask-blur",
        "2",
    ]
    assert run(tmp_path, capsys, *argv, "--seed", "5", "-o", str(out)) == 0
    image = Image.open(out)
    assert (
        "Mask blur: 2" in image.text["parameters"] and "Denoising strength: 0.75" in image.text["parameters"]
    )
    outside = np.asarray(Image.open(mask)) == 0
    outside[:, :52] = False  # beyond the blur's reach (the mask ends at x=44)
    assert (pixels(out)[outside] == pixels(init)[outside]).all()
    inside = (slice(10, 40), slice(10, 40))
    assert np.abs(pixels(out)[inside].astype(int) - pixels(init)[inside]).mean() > 10  # repainted
    assert main(["reproduce", str(out), "--verify"]) == 0  # the recorded paths
    inverted = tmp_path / "inv.png"
    assert run(tmp_path, capsys, *argv, "--invert-mask", "--seed", "5", "-o", str(inverted)) == 0
    assert "Mask mode: Inpaint not masked" in Image.open(inverted).text["parameters"]
    assert (pixels(inverted)[inside] == pixels(init)[inside]).all()  # now the inside is kept


def test_an_image_does_not_depend_on_its_batch(tmp_path, capsys, scene):
    init, mask = scene
    both = ["a yellow star", "--init-image", str(init), "--mask", str(mask), "--seed", "7"]
    assert run(tmp_path, capsys, *both, "-n", "2", "--batch-size", "2", "-o", str(tmp_path / "b.png")) == 0
    assert (
        run(
            tmp_path,
            capsys,
            "a yellow star",
            "--init-image",
            str(init),
            "--mask",
            str(mask),
            "--seed",
            "8",
            "-o",
            str(tmp_path / "one.png"),
        )
        == 0
    )
    assert_same_image(tmp_path / "b-00001.png", tmp_path / "one.png")


def lab_mask(tmp_path):
    path = tmp_path / "lab.tif"
    Image.new("LAB", (80, 48)).save(path)
    return str(path)


BAD = [
    (lambda t: ["--strength", "1.5"], "strength 1.5 must be a finite number from 0 to 1"),
    (lambda t: ["--strength", "-0.5"], "strength -0.5 must be a finite number from 0 to 1"),
    (lambda t: ["--strength", "0.1"], "strength=0.1 of 6 steps runs no denoising step"),
    (
        lambda t: ["--mask", str(t / "small.png")],
        "the mask is 16x16 but the init image is 80x48; they must match",
    ),
    (lambda t: ["--mask", "nope.png"], "mask nope.png: no such file"),
    (lambda t: ["--mask", "text.png"], "mask text.png: not an image file PIL can read"),
    (lambda t: ["--mask", lab_mask(t)], "mask: a LAB image cannot be made a one-channel mask"),
    (lambda t: ["--mask", str(t / "mask.png"), "--mask-blur", "-1"], "mask-blur -1 must be an integer >= 0"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[m[:24] for _, m in BAD])
def test_bad_input_one_line_exit_2(tmp_path, capsys, scene, extra, message):
    init, _ = scene
    Image.new("L", (16, 16)).save(tmp_path / "small.png")
    (tmp_path / "text.png").write_text("not a picture")
    os.chdir(tmp_path)
    assert main([*STEPS, "x", "--init-image", str(init), "-o", "out.png", *extra(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gen: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out.png").exists()


def test_installed_command(tmp_path, scene):
    init, mask = scene
    exe = shutil.which("gen")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "x.png"
    argv = [exe, "a yellow star", "--init-image", str(init), "--mask", str(mask), "-o", str(out), *STEPS]
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert done.returncode == 0 and done.stdout.strip() == str(out), done.stderr
    assert Image.open(out).size == (80, 48)
    bad = subprocess.run([exe, "x", "--mask", str(mask)], capture_output=True, text=True, env=env)
    assert (
        bad.returncode == 2
        and bad.stderr.strip()
        == "gen: error: a mask needs an init image, the picture to inpaint (--init-image; init_image over HTTP)"
    )
    assert json.loads(Image.open(out).text[metadata.JSON_KEY])["mask_hash"]


def test_eval_inpaint_and_img2img_tables(capsys):
    """The judged tables README quotes, small: the embedded model repaints the masked square and keeps every
    pixel outside it; a strength sweep goes from keeping the picture to following the prompt."""
    assert main(["eval", "--task", "inpaint", "--count", "6", "--steps", "10", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    full = report["result"]["1"]
    assert report["task"] == "inpaint" and full["new object"] >= 0.8 and full["background kept"] >= 0.8
    assert full["outside max"] == 0 and 0 < full["outside mean, pipeline"] < 5  # the VAE's round trip only
    assert main(["eval", "--task", "img2img", "--count", "6", "--steps", "10", "--guidance", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split() == [
        "strength",
        "position",
        "kept",
        "shape",
        "kept",
        "colour",
        "kept",
        "prompt",
        "followed",
    ]
    rows = {line.split()[0]: [float(x.rstrip("%")) for x in line.split()[1:]] for line in table[2:]}
    assert (
        rows["0.1"][0] >= 80 and rows["0.1"][3] == 0
    )  # low strength: the original's position, not the prompt
    assert rows["1"][3] >= 80 and rows["1"][0] <= 20  # full strength: the prompt
