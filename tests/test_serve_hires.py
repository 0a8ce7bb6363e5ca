"""Hires fix and upscaling through A1111's API with the unchanged webuiapi client, and the jobs API: the served
image equals the CLI's, the upscaler lists are A1111's shape, bad input is a 422 naming the value."""

import base64
import io

import numpy as np
import pytest
import webuiapi
from PIL import Image

from tests.images import assert_same_image
from tests.serve_support import PROMPT, cli_image, png, serving, shared_models

HIRES_CLI = ["--steps", "4", "--hires-scale", "2", "--hires-steps", "3", "--hires-strength", "0.6"]


@pytest.fixture(scope="module")
def server():
    shared_models()
    with serving(max_pixels=128 * 128) as running:
        yield running


def webui(server) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(
        host="127.0.0.1", port=int(server.url.rsplit(":", 1)[1]), sampler="DPM++ 2M", steps=4
    )


def test_webuiapi_enable_hr_equals_the_cli(server, tmp_path):
    result = webui(server).txt2img(
        prompt=PROMPT,
        seed=21,
        width=64,
        height=64,
        cfg_scale=5.0,
        enable_hr=True,
        hr_scale=2,
        hr_upscaler=webuiapi.HiResUpscaler.Latent,
        hr_second_pass_steps=3,
        denoising_strength=0.6,
    )
    image = result.image
    assert image.size == (128, 128)
    parameters = image.text["parameters"]
    assert (
        "Size: 64x64" in parameters
        and "Hires upscale: 2, Hires steps: 3, Hires upscaler: Latent" in parameters
    )
    assert result.info["denoising_strength"] == 0.6
    assert_same_image(image, cli_image(tmp_path, PROMPT, 21, "--sampler", "dpm++_2m", *HIRES_CLI), exact=True)


def test_jobs_api_hires_equals_the_cli(server, tmp_path):
    body = {
        "prompt": PROMPT,
        "seed": 22,
        "steps": 4,
        "hires_scale": 2.0,
        "hires_steps": 3,
        "hires_strength": 0.6,
    }
    with server.client() as client:
        job = client.post("/gen/v1/jobs?stream=true", json=body)
        assert job.status_code == 200, job.text
        url = (
            next(line for line in job.text.splitlines() if '"url"' in line).split('"url": "')[1].split('"')[0]
        )
        image = Image.open(io.BytesIO(client.get(url).content))
    assert_same_image(image, cli_image(tmp_path, PROMPT, 22, *HIRES_CLI), exact=True)


def test_upscaler_lists_and_extra_single_image(server):
    api = webui(server)
    assert [u["name"] for u in api.get_upscalers()] == ["None", "Lanczos", "Nearest"]
    modes = api.session.get(api.baseurl + "/latent-upscale-modes").json()
    assert [m["name"] for m in modes][:2] == ["Latent", "Latent (antialiased)"] and len(modes) == 6
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 30, 3), np.uint8))
    by_two = api.extra_single_image(picture, upscaling_resize=2, upscaler_1="Lanczos").image
    assert by_two.tobytes() == picture.resize((60, 40), Image.Resampling.LANCZOS).tobytes()
    to_size = api.extra_single_image(picture, resize_mode=1, upscaling_resize_w=40, upscaling_resize_h=40,
                                     upscaler_1="Nearest").image  # fmt: skip
    assert to_size.size == (40, 40)  # covered (60x40), then the middle 40x40
    assert to_size.tobytes() == picture.resize((60, 40), Image.NEAREST).crop((10, 0, 50, 40)).tobytes()


@pytest.mark.parametrize(
    "route,body,message",
    [
        (
            "txt2img",
            {"enable_hr": True, "hr_upscaler": "ESRGAN_4x"},
            "hires-upscaler 'ESRGAN_4x' must be one of",
        ),
        (
            "txt2img",
            {"enable_hr": True, "hr_scale": 4},
            "size 256x256 is 65536 pixels; is more than this server",
        ),
        (
            "txt2img",
            {"enable_hr": True, "hr_sampler_name": "nope"},
            "hr_sampler_name: unknown sampler 'nope'",
        ),
        (
            "extra-single-image",
            {"upscaler_1": "SwinIR"},
            "upscaler 'SwinIR' is not one of: None, Lanczos, Nearest",
        ),
        ("extra-single-image", {"upscaling_resize": 8}, "size 160x160 is more than this server allows"),
    ],
)
def test_bad_hires_and_upscale_requests_are_one_line_422(server, route, body, message):
    if route == "extra-single-image":
        buffer = io.BytesIO()
        Image.new("RGB", (20, 20), "red").save(buffer, format="PNG")
        body = {"image": base64.b64encode(buffer.getvalue()).decode(), **body}
    else:
        body = {"prompt": PROMPT, "steps": 2, "width": 64, "height": 64, **body}
    with server.client() as client:
        answer = client.post(f"/sdapi/v1/{route}", json=body)
    assert answer.status_code == 422 and message in answer.json()["detail"], answer.text
    assert "\n" not in answer.json()["detail"]


def test_hires_images_reproduce(server, tmp_path):
    from gen.cli import main

    result = webui(server).txt2img(prompt=PROMPT, seed=23, width=64, height=64, enable_hr=True, hr_scale=1.5,
                                   hr_upscaler="Lanczos", denoising_strength=0.5)  # fmt: skip
    out = tmp_path / "served.png"
    out.write_bytes(base64.b64decode(result.json["images"][0]))
    assert png(result.json["images"][0]).size == (96, 96)
    assert main(["reproduce", str(out), "--verify"]) == 0
