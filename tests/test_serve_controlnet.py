"""sd-webui-controlnet's interface on a real server, spoken to by the unchanged webuiapi package: its routes, its
units in txt2img (with hires fix) and img2img, the served image equal to the CLI's with the same unit, the jobs
API's units, the units' pictures kept by the durable store, and bad units answered 422 in one line."""

from __future__ import annotations

import base64
import io
import time

import pytest
import webuiapi
from PIL import Image

from gen.cli import main
from gen.control import detect
from gen.generation.inputs import control_pictures
from gen.serve.models import Models
from tests import components
from tests.images import assert_same_image, differ, pixels
from tests.serve_support import cli_image, png, serving
from tests.test_controlnet import controlnet, red_disc

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-cn")
    tokenizer = components.write_tokenizer(d / "tok")
    components.pipeline(tokenizer, "unet").save_pretrained(d / "unet")
    nets = d / "controlnets"
    controlnet(0).save_pretrained(nets / "net")
    controlnet(1).save_pretrained(nets / "control_v11p_tiny_canny")
    controlnet(2, cross_dim=64).save_pretrained(nets / "wide")
    red_disc(d / "pic.png")
    models = Models.load([str(d / "unet")], device="cpu", dtype="fp32", attention="sdpa")
    with serving(models=models, controlnet_dir=str(nets), state_dir=str(d / "state")) as server:
        yield d, server


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def api_of(server) -> webuiapi.WebUIApi:
    host, port = server.url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=4)


# alwayson_scripts given anew each call: webuiapi's default is one shared dict that its calls write units into
SETTINGS = {"seed": 3, "cfg_scale": 5.0, "width": 32, "height": 32}


def settings() -> dict:
    return {**SETTINGS, "alwayson_scripts": {}}


def test_routes_answer_as_the_extension(setup):
    d, server = setup
    api = api_of(server)
    assert api.controlnet_version() == 3
    names = api.controlnet_model_list()
    assert len(names) == 3 and all(n.endswith("]") and " [" in n for n in names)
    assert any(n.startswith("net [") for n in names)
    modules = api.controlnet_module_list()
    assert modules[0] == "none" and {"canny", "scribble_xdog", "tile_resample"} <= set(modules)
    with server.client() as c:
        detail = c.get("/controlnet/module_list", params={"alias_names": "true"}).json()
        assert "invert (from white bg & black line)" in detail["module_list"]
        canny = detail["module_detail"]["canny"]["sliders"]
        assert [s["name"] for s in canny] == ["Resolution", "low threshold", "high threshold"]
        info = c.get("/gen/v1/info").json()
        assert info["controlnets"] == names and "canny" in info["control_modules"]


def test_detect_equals_the_preprocessor(setup):
    d, server = setup
    picture = Image.open(d / "pic.png")
    answer = api_of(server).controlnet_detect([picture], module="canny", processor_res=64)
    assert answer.info == "Success"
    want = detect(picture, "canny", 64, 64, 64)  # webuiapi sends thresholds 64, 64
    assert (pixels(answer.images[0]) == pixels(want)).all()


def test_webuiapi_unit_equals_the_cli(setup, tmp_path):
    d, server = setup
    unit = webuiapi.ControlNetUnit(
        image=Image.open(d / "pic.png"),
        module="canny",
        model="net",
        weight=0.7,
        guidance_start=0.1,
        guidance_end=0.9,
        control_mode=2,
    )
    served = api_of(server).txt2img(prompt=PROMPT, controlnet_units=[unit], **settings())
    assert "ControlNet 0" in served.info["infotexts"][0]
    spec = (
        f"model={d / 'controlnets' / 'net'},image={d / 'pic.png'},module=canny,weight=0.7,start=0.1,end=0.9,"
        "mode=control,resize=fill,a=64,b=64"  # webuiapi's defaults: Resize and Fill, thresholds 64
    )
    cli = cli_image(
        tmp_path, PROMPT, 3, "--model", str(d / "unet"), "--steps", "4", "--guidance", "5", "--sampler",
        "euler", "--width", "32", "--height", "32", "--control", spec,
    )  # fmt: skip
    assert_same_image(served.image, cli, exact=True)
    plain = api_of(server).txt2img(prompt=PROMPT, **settings())
    assert differ(plain.image, served.image)


def test_hires_and_img2img_with_units(setup, tmp_path):
    d, server = setup
    picture = Image.open(d / "pic.png")
    api = api_of(server)
    unit = webuiapi.ControlNetUnit(image=picture, module="canny", model="control_v11p_tiny_canny [")
    hires = api.txt2img(
        prompt=PROMPT, enable_hr=True, hr_scale=2, hr_second_pass_steps=3, denoising_strength=0.6,
        controlnet_units=[unit], **settings(),
    )  # fmt: skip
    assert hires.image.size == (64, 64)
    low = webuiapi.ControlNetUnit(image=picture, module="canny", model="canny", hr_option="Low res only")
    only_low = api.txt2img(
        prompt=PROMPT, enable_hr=True, hr_scale=2, hr_second_pass_steps=3, denoising_strength=0.6,
        controlnet_units=[low], **settings(),
    )  # fmt: skip
    assert differ(hires.image, only_low.image)
    served = tmp_path / "served.png"
    hires.image.save(served, pnginfo=_pnginfo(hires))
    assert main(["reproduce", str(served), "--control-image", str(d / "pic.png"), "--verify"]) == 0
    # img2img: a unit without an image reads the init image, as the extension's do
    no_image = {"module": "canny", "model": "net", "enabled": True}
    body = {
        "init_images": [b64(picture)],
        "prompt": PROMPT,
        "steps": 4,
        "denoising_strength": 0.7,
        **SETTINGS,
    }
    with server.client() as c:
        steered = c.post(
            "/sdapi/v1/img2img", json={**body, "alwayson_scripts": {"ControlNet": {"args": [no_image]}}}
        )
        given = c.post(
            "/sdapi/v1/img2img",
            json={
                **body,
                "alwayson_scripts": {"controlnet": {"args": [{**no_image, "image": b64(picture)}]}},
            },
        )
        plain = c.post("/sdapi/v1/img2img", json=body)
    assert steered.status_code == given.status_code == plain.status_code == 200, steered.text
    a, b, p = (png(r.json()["images"][0]) for r in (steered, given, plain))
    assert_same_image(a, b, exact=True)
    assert differ(a, p)
    assert "image" not in str(steered.json()["parameters"]["alwayson_scripts"])


def _pnginfo(result):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in result.images[0].info.items():
        info.add_text(key, value)
    return info


def test_jobs_api_units_and_the_store_keeps_their_pictures(setup):
    d, server = setup
    picture = b64(Image.open(d / "pic.png"))
    unit = {"model": "net", "image": picture, "module": "canny", "weight": 0.7}
    job = {
        "prompt": PROMPT,
        "seed": 3,
        "steps": 4,
        "guidance": 5.0,
        "width": 32,
        "height": 32,
        "sampler": "euler",
    }
    with server.client() as c:
        made = c.post("/gen/v1/jobs", params={"stream": "false"}, json={**job, "control": [unit]})
        assert made.status_code == 202, made.text
        job_id = made.json()["id"]
        for _ in range(600):
            status = c.get(f"/gen/v1/jobs/{job_id}").json()
            if status["status"] in ("done", "failed"):
                break
            time.sleep(0.1)
        assert status["status"] == "done", status
        served = c.get(f"/gen/v1/jobs/{job_id}/images/0.png").content
        a1111 = c.post(
            "/sdapi/v1/txt2img",
            json={
                "prompt": PROMPT, "sampler_name": "Euler", "steps": 4, **SETTINGS,
                "alwayson_scripts": {"controlnet": {"args": [{**unit, "resize_mode": "Crop and Resize"}]}},
            },
        )  # fmt: skip
        bad = c.post("/gen/v1/jobs", json={**job, "control": [{**unit, "weights": 1}]})
        assert bad.status_code == 422
    assert_same_image(Image.open(io.BytesIO(served)), png(a1111.json()["images"][0]), exact=True)
    state = server.state
    record = state.store.get(job_id)
    assert record.control and Image.open(io.BytesIO(record.control[0])).size == (48, 40)
    from gen.serve.store import restore

    again = restore(record, state.models.default, state.config)
    assert again.control.hashes == control_pictures([Image.open(d / "pic.png")]).hashes


@pytest.mark.parametrize(
    ("unit", "message"),
    [
        ({"model": "nope"}, "ControlNet unit 0: model 'nope' not found; models: "),
        ({"model": "None"}, "ControlNet unit 0: no model selected"),
        ({"module": "cany"}, "ControlNet unit 0: unknown preprocessor 'cany'; choose one of none, canny"),
        (
            {"module": "openpose"},
            "preprocessor 'openpose' needs lllyasviel's Annotators weights (body_pose_model.pth) in",
        ),
        ({"weight": 3.0}, "ControlNet unit 0: weight 3.0 must be a finite number from 0 to 2"),
        (
            {"guidance_start": 0.8, "guidance_end": 0.2},
            "guidance-start 0.8 must be less than guidance-end 0.2",
        ),
        ({"resize_mode": "Stretch"}, "resize-mode 'Stretch' must be one of"),
        ({"image": None}, "ControlNet unit 0: no image selected"),
        ({"image": "bm90IGEgcGljdHVyZQ=="}, "ControlNet unit 0's image"),
        ({"mask": "x"}, "unit masks (the inpaint modules') are not supported"),
        (
            {"image": "BIG"},
            "ControlNet unit 0's image is 1100x1000 = 1100000 pixels, more than this server allows",
        ),
        (
            {"model": "wide"},
            "ControlNet 0 was made for SD (text width 64), but this pipeline's UNet is SD (text width 32)",
        ),
    ],
)
def test_bad_units_are_422_in_one_line(setup, unit, message):
    d, server = setup
    base = {"model": "net", "image": b64(Image.open(d / "pic.png")), "module": "canny"}
    if unit.get("image") == "BIG":  # over --max-pixels (1048576): refused from its header, before decoding
        unit = {"image": b64(Image.new("RGB", (1100, 1000)))}
    body = {
        "prompt": PROMPT,
        "steps": 4,
        **SETTINGS,
        "alwayson_scripts": {"controlnet": {"args": [{**base, **unit}]}},
    }
    with server.client() as c:
        answer = c.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"] if "detail" in answer.json() else answer.json()["error"]
    text = detail if isinstance(detail, str) else str(detail)
    assert message in text and "\n" not in text, text


def test_disabled_units_and_out_of_range_settings_as_the_extension(setup):
    d, server = setup
    picture = b64(Image.open(d / "pic.png"))
    body = {"prompt": PROMPT, "steps": 4, "sampler_name": "Euler", **SETTINGS}
    unit = {"model": "net", "image": picture, "module": "tile_resample"}
    with server.client() as c:
        off = c.post(
            "/sdapi/v1/txt2img",
            json={**body, "alwayson_scripts": {"controlnet": {"args": [{**unit, "enabled": False}]}}},
        )
        plain = c.post("/sdapi/v1/txt2img", json=body)
        # threshold_a 64 is outside tile_resample's 1-8: its default, as the extension resets it
        reset = c.post(
            "/sdapi/v1/txt2img",
            json={
                **body,
                "alwayson_scripts": {
                    "controlnet": {"args": [{**unit, "threshold_a": 64, "processor_res": -1}]}
                },
            },
        )
        default = c.post(
            "/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [unit]}}}
        )
    assert off.status_code == plain.status_code == reset.status_code == default.status_code == 200
    assert_same_image(png(off.json()["images"][0]), png(plain.json()["images"][0]), exact=True)
    assert_same_image(png(reset.json()["images"][0]), png(default.json()["images"][0]), exact=True)
    assert differ(png(default.json()["images"][0]), png(plain.json()["images"][0]))
