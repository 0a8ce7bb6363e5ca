"""ControlNet units on the command line (`--control`): the CLI's image equal to the pipeline called by hand on the
same control image, the sd-webui-controlnet preprocessing (module, resize modes, Pixel Perfect), hires fix's
passes (hr_option), the PNG record and `gen reproduce`, and bad input in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image, ImageDraw

from gen.cli import main
from gen.control import detect, fit, pixel_perfect
from gen.generation import metadata
from gen.loading.pipeline import load_pipeline
from gen.pipelines import ControlNetPipeline
from tests import components
from tests.images import assert_same_image, differ, pixels
from tests.test_controlnet import controlnet, red_disc

PROMPT = "a red circle"
RUN = ["--steps", "4", "--seed", "3", "--width", "32", "--height", "32", "--quiet", "--overwrite"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny UNet model folder, two ControlNets for it, one for a 64-wide base, a DiT model, and a picture."""
    d = tmp_path_factory.mktemp("cn")
    tokenizer = components.write_tokenizer(d / "tok")
    components.pipeline(tokenizer, "unet").save_pretrained(d / "unet")
    components.pipeline(tokenizer).save_pretrained(d / "dit")
    controlnet(0).save_pretrained(d / "net")
    controlnet(1).save_pretrained(d / "net2")
    controlnet(2, cross_dim=64).save_pretrained(d / "wide")
    red_disc(d / "pic.png")
    return d


def unit(d, net: str = "net", **extra) -> list[str]:
    fields = {"model": d / net, "image": d / "pic.png", **extra}
    return ["--control", ",".join(f"{k}={v}" for k, v in fields.items())]


def by_hand(d, control_image, **kwargs) -> np.ndarray:
    pipe = load_pipeline(str(d / "unet"))
    pipe.set_progress_bar_config(disable=True)
    net = ControlNetModel.from_pretrained(str(d / "net"))
    steered = ControlNetPipeline.from_pipe(pipe, controlnet=net)
    out = steered(
        PROMPT,
        image=control_image,
        num_inference_steps=4,
        guidance_scale=5.0,
        height=32,
        width=32,
        generator=[torch.Generator().manual_seed(3)],
        **kwargs,
    )
    return pixels(out.images[0])


def test_cli_equals_the_pipeline_on_the_same_control_image(parts, tmp_path):
    out = tmp_path / "cli.png"
    args = [PROMPT, "--model", str(parts / "unet"), "-o", str(out), *RUN]
    assert main([*args, *unit(parts, module="canny", weight=0.7, start=0.1, end=0.9)]) == 0
    edges = fit(detect(Image.open(parts / "pic.png"), "canny", None, None, 512), 32, 32, "Crop and Resize")
    hand = by_hand(
        parts, edges, controlnet_conditioning_scale=0.7, control_guidance_start=0.1, control_guidance_end=0.9
    )
    assert_same_image(out, hand, exact=True)
    plain = tmp_path / "plain.png"
    assert main([PROMPT, "--model", str(parts / "unet"), "-o", str(plain), *RUN]) == 0
    assert differ(out, plain)  # the net steers


def test_modes_resize_modes_and_pixel_perfect_reach_the_image(parts, tmp_path):
    made = {}
    for name, extra in {
        "plain": {},
        "prompt": {"mode": "prompt"},
        "control": {"mode": "control"},
        "fill": {"resize": "fill"},
        "just": {"resize": "just"},
        "perfect": {"module": "canny", "pixel_perfect": 1},
        "canny": {"module": "canny"},
    }.items():
        out = tmp_path / f"{name}.png"
        assert (
            main([PROMPT, "--model", str(parts / "unet"), "-o", str(out), *RUN, *unit(parts, **extra)]) == 0
        )
        made[name] = pixels(out)
    names = list(made)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert differ(made[a], made[b]), (a, b)
    # Pixel Perfect: the short side the 32x32 crop needs (40 * 32/40), the detected map then fitted
    assert pixel_perfect(32, 32, 48, 40, "Crop and Resize") == 32
    assert pixel_perfect(32, 32, 48, 40, "Resize and Fill") == 27


def test_resize_modes_as_sd_webui_controlnet():
    picture = Image.new("RGB", (40, 20), (10, 20, 30))
    ImageDraw.Draw(picture).rectangle((0, 0, 9, 19), fill=(200, 0, 0))
    crop = np.asarray(fit(picture, 20, 20, "Crop and Resize"))
    assert crop.shape == (20, 20, 3) and (crop == (10, 20, 30)).all()  # the middle of the picture
    just = np.asarray(fit(picture, 20, 20, "Just Resize"))
    assert (just[:, :4] == (200, 0, 0)).all()  # stretched: the red quarter stays a quarter
    filled = np.asarray(fit(picture, 20, 20, "Resize and Fill"))
    assert filled.shape == (20, 20, 3) and (filled[0] == (10, 20, 30)).all()  # the border's median colour
    assert (filled[5:15, :4] == (200, 0, 0)).all()


def test_two_units_and_hires_passes(parts, tmp_path):
    model = ["--model", str(parts / "unet")]
    two = tmp_path / "two.png"
    both = [*unit(parts), *unit(parts, "net2", module="invert", weight=0.5)]
    assert main([PROMPT, *model, "-o", str(two), *RUN, *both]) == 0
    one = tmp_path / "one.png"
    assert main([PROMPT, *model, "-o", str(one), *RUN, *unit(parts)]) == 0
    assert differ(two, one)
    hires = ["--hires-scale", "2", "--hires-steps", "3", "--hires-strength", "0.6"]
    made = {}
    for option in ("both", "low", "high"):
        out = tmp_path / f"hires-{option}.png"
        assert main([PROMPT, *model, "-o", str(out), *RUN, *hires, *unit(parts, hr=option)]) == 0
        made[option] = pixels(out)
        assert made[option].shape == (64, 64, 3)
    assert differ(made["both"], made["low"]) and differ(made["both"], made["high"])
    assert main(["reproduce", str(tmp_path / "hires-both.png"), "--verify"]) == 0


def test_record_a1111_keys_and_reproduce(parts, tmp_path, capsys):
    out = tmp_path / "cn.png"
    args = [PROMPT, "--model", str(parts / "unet"), "-o", str(out), *RUN]
    assert main([*args, *unit(parts, module="canny", a=50, b=150)]) == 0
    record = metadata.read(out)
    assert record["options"]["control"][0]["threshold_a"] == 50.0
    assert len(record["control_image_hashes"][0]) == 64
    text = Image.open(out).info["parameters"]
    assert 'ControlNet 0: "Module: canny, Model: net, Weight: 1.0, Resize Mode: Crop and Resize' in text
    assert "Threshold A: 50.0, Threshold B: 150.0, Guidance Start: 0.0" in text
    assert main(["reproduce", str(out), "--verify"]) == 0
    other = tmp_path / "other.png"
    Image.new("RGB", (48, 40), "white").save(other)
    capsys.readouterr()
    assert main(["reproduce", str(out), "--control-image", str(other)]) == 2
    err = capsys.readouterr().err
    assert "(unit 0) is not the one" in err and "give the original with --control-image" in err


@pytest.mark.parametrize(
    ("extra", "model", "message"),
    [
        ({"module": "cany"}, "unet", "unknown preprocessor 'cany'; choose one of none, canny"),
        (
            {"module": "openpose"},
            "unet",
            "preprocessor 'openpose' needs lllyasviel's Annotators weights (body_pose_model.pth) in",
        ),
        ({"weight": 3}, "unet", "ControlNet unit 0: weight 3.0 must be a finite number from 0 to 2"),
        ({"start": 0.6, "end": 0.2}, "unet", "guidance-start 0.6 must be less than guidance-end 0.2"),
        (
            {"a": 999, "module": "canny"},
            "unet",
            "threshold_a 999 for canny (low threshold) must be between 1 and 255",
        ),
        ({"resize": "stretch"}, "unet", "resize-mode 'stretch' must be one of ['Crop and Resize'"),
        ({}, "dit", "ControlNet steers UNet models (SD 1.x, 2.x, SDXL); this model's denoiser is gen's DiT"),
        (
            {"net": "wide"},
            "unet",
            "ControlNet 0 was made for SD (text width 64), but this pipeline's UNet is SD (text width 32)",
        ),
    ],
)
def test_bad_control_input_is_one_line(parts, tmp_path, capsys, extra, model, message):
    net = extra.pop("net", "net")
    argv = [
        PROMPT,
        "--model",
        str(parts / model),
        "-o",
        str(tmp_path / "x.png"),
        *RUN,
        *unit(parts, net, **extra),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_missing_picture_and_bad_syntax_are_one_line(parts, tmp_path, capsys):
    out = ["-o", str(tmp_path / "x.png"), *RUN, "--model", str(parts / "unet")]
    assert main([PROMPT, *out, "--control", f"model={parts / 'net'},image={tmp_path / 'none.png'}"]) == 2
    assert "control image of unit 0" in capsys.readouterr().err
    assert main([PROMPT, *out, "--control", "model"]) == 2
    assert "is not KEY=VALUE" in capsys.readouterr().err
    mask = ["--init-image", str(parts / "pic.png"), "--mask", str(parts / "pic.png")]
    assert main([PROMPT, *out, *mask, *unit(parts)]) == 2
    assert "ControlNet with inpainting (a mask) is not supported" in capsys.readouterr().err


def test_img2img_with_a_control_unit(parts, tmp_path):
    out, plain = tmp_path / "i2i.png", tmp_path / "i2i-plain.png"
    init = ["--init-image", str(parts / "pic.png"), "--strength", "0.7", "--model", str(parts / "unet")]
    assert main([PROMPT, "-o", str(out), *RUN, *init, *unit(parts, module="canny")]) == 0
    assert main([PROMPT, "-o", str(plain), *RUN, *init]) == 0
    assert pixels(out).shape == (32, 32, 3) and differ(out, plain)
    assert main(["reproduce", str(out), "--verify"]) == 0


def test_lora_and_prompt_weights_keep_working_with_a_unit(parts, tmp_path):
    from tests.test_lora import adapted

    tokenizer = components.write_tokenizer(tmp_path / "tok")
    adapted(tokenizer, "unet", 1).save_lora_weights(tmp_path / "style.safetensors")
    model = ["--model", str(parts / "unet"), *RUN]
    made = {}
    for name, extra in {
        "control": unit(parts),
        "control+lora": [*unit(parts), "--lora", f"{tmp_path / 'style.safetensors'}:0.8"],
        "lora": ["--lora", f"{tmp_path / 'style.safetensors'}:0.8"],
    }.items():
        out = tmp_path / f"{name}.png"
        assert main([PROMPT, "-o", str(out), *model, *extra]) == 0
        made[name] = out
    assert differ(made["control+lora"], made["control"]) and differ(made["control+lora"], made["lora"])
    assert main(["reproduce", str(made["control+lora"]), "--verify"]) == 0
    weighted = tmp_path / "weighted.png"
    assert main(["(a red:1.5) circle", "-o", str(weighted), *model, *unit(parts)]) == 0
    assert differ(weighted, made["control"])
