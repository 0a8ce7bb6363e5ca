"""gen serve's A1111 img2img route (image-to-image and inpainting) through webuiapi, unchanged: each served image is
the CLI's image for the same init image, mask, prompt, seed and settings, bit for bit; its PNG re-makes with
`gen reproduce --init-image ... --verify`; bad uploads are one-line 422s."""

import base64

import httpx
import pytest
import webuiapi
from PIL import Image

from gen.cli import main
from tests.images import assert_same_image
from tests.serve_support import cli_image, init_pictures, serving, shared_models

STEPS = ["--steps", "6", "--sampler", "euler_a", "--cfg", "5"]


@pytest.fixture(scope="module")
def server():
    shared_models()
    with serving() as running:
        yield running


@pytest.fixture
def pictures(tmp_path):
    return init_pictures(tmp_path)


def webui(server) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(
        host="127.0.0.1", port=int(server.url.rsplit(":", 1)[1]), sampler="Euler a", steps=6
    )


@pytest.mark.parametrize("inpaint", [False, True], ids=["img2img", "inpaint"])
def test_webuiapi_img2img_equals_the_cli_and_reproduces(server, tmp_path, pictures, inpaint):
    image, mask = pictures
    extra = {"mask_image": mask, "mask_blur": 2} if inpaint else {}
    result = webui(server).img2img(
        images=[image],
        prompt="a yellow star",
        seed=3,
        cfg_scale=5.0,
        denoising_strength=0.6,
        batch_size=2,
        width=64,
        height=48,
        **extra,
    )
    assert len(result.images) == 2 and result.images[0].size == (64, 48)
    assert result.info["denoising_strength"] == 0.6 and result.info["all_seeds"] == [3, 4]
    assert result.info["is_using_inpainting_conditioning"] is inpaint
    assert "init_images" not in result.parameters or result.parameters["init_images"] is None
    text = result.images[1].text["parameters"]
    assert "Denoising strength: 0.6" in text and ("Mask blur: 2" in text) is inpaint
    args = ["--init-image", str(tmp_path / "in.png"), "--strength", "0.6", *STEPS]
    if inpaint:
        args += ["--mask", str(tmp_path / "mask.png"), "--mask-blur", "2"]
    assert_same_image(result.images[1], cli_image(tmp_path, "a yellow star", 4, *args))  # beside seed 3
    served = tmp_path / "served.png"
    served.write_bytes(base64.b64decode(result.json["images"][1]))
    again = ["--init-image", str(tmp_path / "in.png")] + (
        ["--mask", str(tmp_path / "mask.png")] if inpaint else []
    )
    assert main(["reproduce", str(served), "--verify", *again]) == 0


def b64(image: Image.Image) -> str:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_bad_uploads_are_one_line_422s(server, pictures):
    image, mask = pictures
    cases = [
        ({"init_images": []}, "init_images: List should have at least 1 item"),
        ({}, "init_images: Field required"),
        ({"init_images": ["not base64!"]}, "image is not a base64-encoded picture"),
        (
            {"init_images": [b64(image)], "mask": b64(mask.resize((16, 16)))},
            "the mask is 16x16 but the init image is 64x48",
        ),
        ({"init_images": [b64(image)], "denoising_strength": 1.5}, "denoising_strength"),
        ({"init_images": [b64(image)], "denoising_strength": 0.01, "steps": 6}, "runs no denoising step"),
    ]
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for body, message in cases:
            response = client.post("/sdapi/v1/img2img", json={"prompt": "x", **body})
            assert response.status_code == 422, (body, response.text)
            assert message in response.text, response.text
        assert client.get("/sdapi/v1/progress").status_code == 200  # still serving
