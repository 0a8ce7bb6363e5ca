"""SD3 and Flux image-to-image and inpainting: gen's pipelines give StableDiffusion3Img2ImgPipeline's,
FluxImg2ImgPipeline's and FluxInpaintPipeline's images on the same tiny components, for their schedulers and
strengths, negatives and true CFG, and StableDiffusion3InpaintPipeline's latents (its decode leaves out the VAE's
shift_factor, which its text-to-image and image-to-image pipelines add); bad input is one line; they share the
text-to-image pipeline's weights through from_pipe."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import (
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
)
from PIL import Image

from gen.pipelines import (
    FluxImageToImagePipeline,
    FluxTextToImagePipeline,
    SD3ImageToImagePipeline,
    SD3InpaintPipeline,
    SD3TextToImagePipeline,
)
from gen.pipelines import (
    FluxInpaintPipeline as GenFluxInpaint,
)
from gen.pipelines import images as I
from gen.pipelines.flux import unpack
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


def mask() -> Image.Image:
    m = np.zeros((32, 32), np.uint8)
    m[8:24, 4:20] = 255
    return Image.fromarray(m)


INPAINT = {
    "sd3": (SD3InpaintPipeline, StableDiffusion3InpaintPipeline, {"channels": 16}, "latent"),
    "flux": (GenFluxInpaint, FluxInpaintPipeline, {}, "np"),
}


@pytest.mark.parametrize("strength", [0.5, 1.0])
@pytest.mark.parametrize("scheduler", ["euler", "euler-dynamic"])
@pytest.mark.parametrize("family", INPAINT)
def test_inpainting_equals_diffusers(tmp_path, family, scheduler, strength):
    """SD3 on a 16-channel transformer, the one diffusers' SD3 inpainting blends for; compared as latents."""
    ours_cls, theirs_cls, options, output = INPAINT[family]
    build = {"sd3": sd3_parts, "flux": flux_parts}[family]
    parts = build(tmp_path, scheduler=SCHEDULERS[scheduler](), **options)
    pipes = ours_cls(**copy.deepcopy(parts)), theirs_cls(**parts)
    call = {"prompt": PROMPT, "image": picture(), "mask_image": mask(), "strength": strength}
    call |= {"num_inference_steps": 4, "height": 32, "width": 32, "output_type": output}
    made = []
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
        made.append(np.asarray(pipe(**call, generator=[torch.Generator().manual_seed(0)]).images))
    assert made[0].shape == made[1].shape
    assert np.abs(made[0] - made[1]).max() < TOLERANCE


def test_inpainting_keeps_the_image_outside_the_mask(tmp_path):
    """At the last step the unmasked latents are the image's own: decoded, the outside matches plain encoding."""
    pipe = GenFluxInpaint(**flux_parts(tmp_path))
    pipe.set_progress_bar_config(disable=True)
    call = {"prompt": PROMPT, "image": picture(), "mask_image": mask(), "num_inference_steps": 4}
    out = pipe(
        **call, strength=1.0, generator=[torch.Generator().manual_seed(0)], output_type="latent"
    ).images
    pixels = pipe.image_processor.preprocess(picture(), height=32, width=32)
    clean = I.encode(pipe.vae, pixels, [torch.Generator().manual_seed(0)], 1)
    latent_mask = torch.nn.functional.interpolate(
        I.processors(pipe.latent_stride)[1].preprocess(mask(), height=32, width=32), size=clean.shape[2:]
    )
    outside = (latent_mask == 0).expand_as(clean)
    latents = unpack(out, clean.shape[2], clean.shape[3])
    assert torch.allclose(latents[outside], clean[outside], atol=1e-6)


def test_padding_mask_crop_equals_diffusers(tmp_path):
    """Flux with padding_mask_crop: diffusers' crop of image and mask, repainted at the call's size and pasted
    back into the whole image (PIL out, within one 8-bit level of rounding); outside the crop, the image's own
    pixels."""
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8))
    hole = np.zeros((64, 48), np.uint8)
    hole[30:44, 10:22] = 255
    call = {"prompt": PROMPT, "image": image, "mask_image": Image.fromarray(hole), "strength": 0.8}
    call |= {"num_inference_steps": 3, "height": 32, "width": 32, "padding_mask_crop": 4}
    parts = flux_parts(tmp_path)
    made = []
    for pipe in (GenFluxInpaint(**copy.deepcopy(parts)), FluxInpaintPipeline(**parts)):
        pipe.set_progress_bar_config(disable=True)
        made.append(pipe(**call, generator=[torch.Generator().manual_seed(0)]).images[0])
    ours, theirs = (np.asarray(m, dtype=int) for m in made)
    assert ours.shape == theirs.shape == (64, 48, 3)
    assert np.abs(ours - theirs).max() <= 1
    assert np.array_equal(ours[:8], np.asarray(image)[:8])  # far above the mask: pasted back untouched
    assert not np.array_equal(ours[30:44, 10:22], np.asarray(image)[30:44, 10:22])  # repainted


def test_padding_mask_crop_refusals_are_one_line(tmp_path):
    pipe = GenFluxInpaint(**flux_parts(tmp_path))
    call = {"prompt": PROMPT, "image": picture(), "mask_image": mask(), "num_inference_steps": 2}
    for extra, message in (
        ({"padding_mask_crop": -1}, "padding_mask_crop=-1 must be an integer >= 0"),
        ({"padding_mask_crop": 2, "output_type": "np"}, "padding_mask_crop needs output_type='pil'"),
    ):
        with pytest.raises(ValueError, match=message) as error:
            pipe(**call, **extra)
        assert "\n" not in str(error.value)
