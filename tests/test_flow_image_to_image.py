"""SD3 and Flux image-to-image: gen's pipelines give StableDiffusion3Img2ImgPipeline's and FluxImg2ImgPipeline's
images on the same tiny components, for their schedulers and strengths, negatives and true CFG; bad input is one
line; they share the text-to-image pipeline's weights through from_pipe."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import FluxImg2ImgPipeline, StableDiffusion3Img2ImgPipeline
from PIL import Image

from gen.pipelines import (
    FluxImageToImagePipeline,
    FluxTextToImagePipeline,
    SD3ImageToImagePipeline,
    SD3TextToImagePipeline,
)
from tests.flow_parts import flux_parts, sd3_parts
from tests.test_flow import SCHEDULERS, TOLERANCE

FAMILIES = {
    "sd3": (sd3_parts, SD3ImageToImagePipeline, StableDiffusion3Img2ImgPipeline),
    "flux": (flux_parts, FluxImageToImagePipeline, FluxImg2ImgPipeline),
}
PROMPT = "a red circle on a blue background"


def picture() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))


def pair(family: str, folder, scheduler: str):
    build, ours, theirs = FAMILIES[family]
    parts = build(folder, scheduler=SCHEDULERS[scheduler]())
    pipes = ours(**copy.deepcopy(parts)), theirs(**parts)
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    return pipes


def difference(pipes, **call) -> float:
    base = {"prompt": PROMPT, "image": picture(), "num_inference_steps": 4, "height": 32, "width": 32}
    images = [
        pipe(**{**base, **call}, generator=[torch.Generator().manual_seed(0)], output_type="np").images
        for pipe in pipes
    ]
    assert images[0].shape == images[1].shape
    return float(np.abs(images[0] - images[1]).max())


@pytest.mark.parametrize("strength", [0.5, 0.8, 1.0])
@pytest.mark.parametrize("scheduler", ["euler", "euler-shift-3", "euler-dynamic"])
@pytest.mark.parametrize("family", FAMILIES)
def test_image_to_image_equals_diffusers(tmp_path, family, scheduler, strength):
    assert difference(pair(family, tmp_path, scheduler), strength=strength) < TOLERANCE


@pytest.mark.parametrize(
    ("family", "call"),
    [
        ("sd3", {"negative_prompt": "green", "guidance_scale": 4.0}),
        ("sd3", {"guidance_scale": 1.0}),
        ("flux", {"negative_prompt": "green", "true_cfg_scale": 3.0}),
        ("flux", {"guidance_scale": 2.0}),
    ],
)
def test_guidance_variants_equal_diffusers(tmp_path, family, call):
    assert difference(pair(family, tmp_path, "euler"), strength=0.7, **call) < TOLERANCE


def test_from_pipe_shares_the_weights(tmp_path):
    t2i = SD3TextToImagePipeline(**sd3_parts(tmp_path))
    i2i = SD3ImageToImagePipeline.from_pipe(t2i)
    assert i2i.transformer is t2i.transformer and i2i.vae is t2i.vae
    flux = FluxImageToImagePipeline.from_pipe(FluxTextToImagePipeline(**flux_parts(tmp_path / "f")))
    assert isinstance(flux, FluxTextToImagePipeline)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ({"strength": 1.5}, "strength=1.5 must be between 0 and 1"),
        ({"strength": 0.1}, "strength=0.1 of 4 steps runs no denoising step"),
        ({"image": None}, "image"),
    ],
)
def test_bad_input_is_one_line(tmp_path, call, message):
    ours, _ = pair("sd3", tmp_path, "euler")
    with pytest.raises(ValueError, match=message) as error:
        ours(**{"prompt": PROMPT, "image": picture(), "num_inference_steps": 4, **call})
    assert "\n" not in str(error.value)
