"""Hires fix (gen.generation.hires): sizes and upscalers as A1111's, the CLI's image equal to the same steps done
by hand with the pipelines, its PNG record, `gen reproduce`, and bad input in one line."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import gen
from gen.cli import main
from gen.generation.hires import upscale_latents
from gen.generation.upscale import UPSCALERS, resize_image, target_size
from gen.pipelines import ImageToImagePipeline
from tests.images import assert_same_image, differ, pixels

PROMPT = "a red circle on a blue background"
STEPS = ["--steps", "6", "--seed", "11", "--quiet"]


def test_target_sizes_follow_a1111():
    assert target_size(64, 48, 2.0, None, None, 16) == (128, 96)
    assert target_size(64, 48, 1.5, None, None, 16) == (96, 64)  # int(72) rounded down to the stride
    assert target_size(64, 48, None, 128, None, 16) == (128, 96)  # one side: aspect kept
    assert target_size(64, 48, None, None, 96, 16) == (128, 96)
    assert target_size(64, 48, None, 100, 100, 16) == (96, 96)


def test_latent_modes_are_interpolate_and_cover_then_crop():
    x = torch.arange(2 * 4 * 4 * 6, dtype=torch.float32).reshape(2, 4, 4, 6)
    same = upscale_latents(x, 64, 96, 8, "Latent (nearest)")
    assert same.shape == (2, 4, 8, 12) and torch.equal(
        same, x.repeat_interleave(2, -1).repeat_interleave(2, -2)
    )
    bilinear = upscale_latents(x, 64, 96, 8, "Latent")
    assert torch.equal(bilinear, F.interpolate(x, size=(8, 12), mode="bilinear"))
    square = upscale_latents(x, 64, 64, 8, "Latent (bicubic antialiased)")  # 4x6 covers 8x8 as 8x12: crop
    full = F.interpolate(x, size=(8, 12), mode="bicubic", antialias=True)
    assert torch.equal(square, full[..., :, 2:10])


def test_pixel_upscalers_are_pil_resizes():
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 20, 3), np.uint8))
    assert (
        resize_image(picture, 40, 24, "Nearest").tobytes()
        == picture.resize((40, 24), Image.NEAREST).tobytes()
    )
    lanczos = picture.resize((40, 24), Image.Resampling.LANCZOS).tobytes()
    assert resize_image(picture, 40, 24, "Lanczos").tobytes() == lanczos
    assert resize_image(picture, 40, 24, "None").tobytes() == lanczos  # A1111's "None" resizes with Lanczos
    assert resize_image(picture, 24, 24, "Lanczos").size == (24, 24)  # covered, then cropped


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (nearest-exact)", "Lanczos"])
def test_cli_hires_equals_the_pipelines_by_hand(tmp_path, upscaler):
    out = tmp_path / "h.png"
    hires = [
        "--hires-scale",
        "2",
        "--hires-upscaler",
        upscaler,
        "--hires-steps",
        "4",
        "--hires-strength",
        "0.5",
    ]
    assert main([PROMPT, "-o", str(out), *STEPS, *hires]) == 0
    pipe = gen.load_pipeline()
    pipe.vae.enable_slicing()
    generator = [torch.Generator().manual_seed(11)]
    latent = upscaler.startswith("Latent")
    first = pipe(
        PROMPT, num_inference_steps=6, generator=generator, output_type="latent" if latent else "pil"
    )
    if latent:
        mode = {"Latent": "bilinear", "Latent (nearest-exact)": "nearest-exact"}[upscaler]
        image = F.interpolate(first.images, scale_factor=2, mode=mode)
    else:
        image = [first.images[0].resize((128, 128), Image.Resampling.LANCZOS)]
    second = ImageToImagePipeline.from_pipe(pipe)
    made = second(
        PROMPT, image=image, strength=0.5, num_inference_steps=4, generator=generator, height=128, width=128
    )
    assert_same_image(out, made.images[0], exact=True)


def test_hires_record_reproduces_and_a1111_keys(tmp_path, capsys):
    out = tmp_path / "h.png"
    args = ["--hires-width", "128", "--hires-sampler", "euler", "--hires-prompt", "a red circle, sharp"]
    assert main([PROMPT, "-o", str(out), *STEPS, *args]) == 0
    with Image.open(out) as image:
        assert image.size == (128, 128)
        parameters, record = image.text["parameters"], json.loads(image.text["gen"])
    assert "Size: 64x64" in parameters  # A1111's Size is the first pass's
    for pair in (
        "Denoising strength: 0.75",
        "Hires resize: 128x128",
        "Hires upscaler: Latent",
        "Hires sampler: Euler",
    ):
        assert pair in parameters, parameters
    assert 'Hires prompt: "a red circle, sharp"' in parameters and "Hires steps" not in parameters
    assert record["first_pass"] == {"width": 64, "height": 64} and record["options"]["hires_width"] == 128
    capsys.readouterr()
    assert main(["reproduce", str(out), "--verify"]) == 0
    assert "max pixel difference: 0" in capsys.readouterr().out
    plain = tmp_path / "p.png"
    assert main([PROMPT, "-o", str(plain), *STEPS, "--width", "128", "--height", "128"]) == 0
    assert differ(out, plain) and pixels(plain).shape == pixels(out).shape


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["--hires-upscaler", "ESRGAN"],
            "invalid choice: 'ESRGAN' (choose from 'Latent', 'Latent (antialiased)',",
        ),
        (["--hires-scale", "0.5"], "hires-scale 0.5 must be a finite number from 1 to 16"),
        (["--hires-scale", "2", "--hires-strength", "0.01"], "hires fix: strength=0.01 of 6 steps runs no"),
        (["--hires-scale", "2", "--hires-sampler", "nope"], "unknown sampler 'nope'"),
        (["--hires-scale", "2", "--init-image", "x.png"], "hires fix is for text-to-image"),
    ],
)
def test_bad_hires_input_is_one_line(tmp_path, capsys, argv, message):
    assert main([PROMPT, "-o", str(tmp_path / "x.png"), *STEPS, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())


def test_every_upscaler_is_offered_on_the_command_line():
    assert set(UPSCALERS) == {
        "Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)", "Latent (nearest)",
        "Latent (nearest-exact)", "None", "Lanczos", "Nearest",
    }  # fmt: skip
