"""The web page at / in a real browser: headless Chromium (Debian's `chromium` package, installed by .ci/run)
driven by Playwright. Type a prompt, click, wait for the image, check its PNG parameters and pixels."""

import io
import shutil
from contextlib import contextmanager

import pytest
from PIL import Image

from tests.images import assert_same_image
from tests.serve_support import cli_image, init_pictures, serving, shared_models

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")


@contextmanager
def page_of(server):
    """The page at / in headless Chromium, loaded (its sampler list filled); yields (page, page errors)."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            # "model default" + the 17 the served model runs (SD3/Flux-only schedules left out)
            expect(page.locator("#sampler option")).to_have_count(18)
            yield page, errors
        finally:
            browser.close()


def test_page_generates_an_image_with_its_parameters_and_a_download(tmp_path):
    from playwright.sync_api import expect

    shared_models()
    prompt = "a small yellow star in the top left on a black background"
    with serving() as server, page_of(server) as (page, errors):
        page.fill("#prompt", prompt)
        page.fill("#seed", "4")
        page.fill("#steps", "4")
        page.fill("#batch", "2")
        page.select_option("#sampler", "euler")
        page.click("#generate")
        expect(page.locator("#gallery figure")).to_have_count(2, timeout=60_000)
        expect(page.locator("#status")).to_contain_text("done: 2 image(s), seed 4", timeout=30_000)
        captions = page.locator("#gallery .parameters").all_inner_texts()
        links = [a.get_attribute("href") for a in page.locator("#gallery a[download]").all()]
        screenshot = tmp_path / "page.png"
        page.screenshot(path=str(screenshot), full_page=True)
        downloaded = [page.request.get(server.url + href).body() for href in links]
    assert not errors, errors
    print(f"screenshot: {screenshot}")
    newest = Image.open(io.BytesIO(downloaded[0]))  # the gallery shows the newest first
    assert newest.text["parameters"] == captions[0]
    assert (
        newest.text["parameters"].startswith(prompt) and "Seed: 5" in captions[0] and "Seed: 4" in captions[1]
    )
    assert "Steps: 4, Sampler: Euler," in captions[0]
    assert_same_image(
        newest, cli_image(tmp_path, prompt, 5, "--steps", "4", "--sampler", "euler")
    )  # batch of 2
    assert screenshot.stat().st_size > 10_000


def test_page_img2img_upload(tmp_path):
    """Choose an init image and a mask, click: the inpainted image is the CLI's for the same inputs."""
    from playwright.sync_api import expect

    shared_models()
    init_pictures(tmp_path)
    prompt = "a yellow star on a blue background"
    with serving() as server, page_of(server) as (page, errors):
        page.fill("#prompt", prompt)
        page.fill("#seed", "6")
        page.fill("#steps", "6")
        page.fill("#strength", "0.8")
        page.select_option("#sampler", "euler")
        page.set_input_files("#init", str(tmp_path / "in.png"))
        page.set_input_files("#mask", str(tmp_path / "mask.png"))
        page.click("#generate")
        expect(page.locator("#status")).to_contain_text("done: 1 image(s), seed 6", timeout=60_000)
        href = page.locator("#gallery a[download]").first.get_attribute("href")
        made = Image.open(io.BytesIO(page.request.get(server.url + href).body()))
        page.screenshot(path=str(tmp_path / "img2img.png"), full_page=True)
    assert not errors, errors
    assert made.size == (64, 48) and "Denoising strength: 0.8" in made.text["parameters"]
    args = ["--steps", "6", "--sampler", "euler", "--strength", "0.8"]
    args += ["--init-image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png")]
    assert_same_image(made, cli_image(tmp_path, prompt, 6, *args), exact=True)  # alone


def test_page_hires_fix(tmp_path):
    """Tick hires fix, choose an upscaler: the upscaled image is the CLI's with the same --hires-* flags."""
    from playwright.sync_api import expect

    shared_models()
    prompt = "a red circle on a blue background"
    with serving() as server, page_of(server) as (page, errors):
        page.fill("#prompt", prompt)
        page.fill("#seed", "8")
        page.fill("#steps", "5")
        page.check("#hires")
        page.select_option("#hires-upscaler", "Lanczos")
        page.fill("#hires-steps", "3")
        page.click("#generate")
        expect(page.locator("#status")).to_contain_text("done: 1 image(s), seed 8", timeout=60_000)
        href = page.locator("#gallery a[download]").first.get_attribute("href")
        made = Image.open(io.BytesIO(page.request.get(server.url + href).body()))
    assert not errors, errors
    assert made.size == (128, 128) and "Hires upscaler: Lanczos" in made.text["parameters"]
    args = ["--steps", "5", "--hires-scale", "2", "--hires-upscaler", "Lanczos", "--hires-steps", "3"]
    assert_same_image(made, cli_image(tmp_path, prompt, 8, *args), exact=True)  # alone


def test_page_cancel_keeps_the_finished_images():
    """Cancel stops the job (POST .../cancel): the images already in the gallery stay downloadable."""
    from playwright.sync_api import expect

    shared_models()
    with serving(max_batch=1) as server, page_of(server) as (page, errors):
        page.fill("#prompt", "a red circle")
        page.fill("#steps", "30")
        page.fill("#batch", "4")
        page.click("#generate")
        expect(page.locator("#gallery figure")).to_have_count(1, timeout=60_000)  # one of four made
        page.click("#cancel")
        expect(page.locator("#status")).to_contain_text("cancelled", timeout=30_000)
        href = page.locator("#gallery a[download]").first.get_attribute("href")
        assert page.request.get(server.url + href).status == 200
        job = href.split("/")[4]
        assert page.request.get(f"{server.url}/gen/v1/jobs/{job}").json()["status"] == "cancelled"
    assert not errors, errors


def test_page_shows_the_servers_default_steps():
    """A server started with --max-steps 8: the page offers 8 steps, not gen's 20 that the server would refuse."""
    from playwright.sync_api import expect

    shared_models()
    with serving(max_steps=8) as server, page_of(server) as (page, errors):
        expect(page.locator("#steps")).to_have_value("8")
        # left empty: the model's own CFG scale (5 here, 7 for SD3, 1 for Flux), as the placeholder says
        expect(page.locator("#guidance")).to_have_value("")
        expect(page.locator("#guidance")).to_have_attribute("placeholder", "model's own")
    assert not errors, errors


def test_page_controlnet_unit(tmp_path):
    """Choose a control picture, a ControlNet and a preprocessor: the image is the CLI's with that --control."""
    from playwright.sync_api import expect

    from gen.serve.models import Models
    from tests import components
    from tests.test_controlnet import controlnet

    tokenizer = components.write_tokenizer(tmp_path / "tok")
    components.pipeline(tokenizer, "unet").save_pretrained(tmp_path / "unet")
    controlnet(0).save_pretrained(tmp_path / "nets" / "net")
    picture, _ = init_pictures(tmp_path)
    models = Models.load([str(tmp_path / "unet")], device="cpu", dtype="fp32", attention="sdpa")
    with (
        serving(models=models, controlnet_dir=str(tmp_path / "nets")) as server,
        page_of(server) as (page, errors),
    ):
        page.fill("#prompt", "a red circle")
        page.fill("#seed", "8")
        page.fill("#steps", "4")
        page.set_input_files("#control", str(tmp_path / "in.png"))
        page.select_option("#control-model", index=1)
        page.select_option("#control-module", "canny")
        page.fill("#control-weight", "0.8")
        page.click("#generate")
        expect(page.locator("#status")).to_contain_text("done: 1 image(s), seed 8", timeout=60_000)
        href = page.locator("#gallery a[download]").first.get_attribute("href")
        made = Image.open(io.BytesIO(page.request.get(server.url + href).body()))
    assert not errors, errors
    assert 'ControlNet 0: "Module: canny, Model: net, Weight: 0.8' in made.text["parameters"]
    unit = f"model={tmp_path / 'nets' / 'net'},image={tmp_path / 'in.png'},module=canny,weight=0.8"
    cli = cli_image(
        tmp_path, "a red circle", 8, "--steps", "4", "--model", str(tmp_path / "unet"), "--control", unit
    )
    assert_same_image(made, cli, exact=True)  # alone
