"""SD3 and Flux through the front-ends: `gen.generate`, the gen command (PNG metadata, `gen reproduce --verify`),
the samplers by A1111's names, Forge's two Flux guidances, and `gen serve`'s A1111, OpenAI and jobs APIs, on tiny
folders built in code and saved as diffusers saves them. Images are compared with diffusers' own pipelines on the
same folder (TOLERANCE, as in test_flow) and with the CLI's (tests.images.assert_same_image)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FluxImg2ImgPipeline,
    FluxPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3Pipeline,
    UniPCMultistepScheduler,
)
from PIL import Image, ImageFilter

from gen.cli import main
from gen.generation import generate
from tests.flow_parts import flux_parts, sd3_parts
from tests.images import assert_same_image

TOLERANCE = 1e-4
PROMPT = "a red circle"
FP32 = {"dtype": "fp32", "width": 32, "height": 32, "steps": 3}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny SD3, Flux-dev and Flux-schnell folders, saved by diffusers' own pipelines."""
    root = tmp_path_factory.mktemp("flow-models")
    StableDiffusion3Pipeline(**sd3_parts(root / "parts-sd3")).save_pretrained(root / "sd3")
    FluxPipeline(**flux_parts(root / "parts-flux")).save_pretrained(root / "flux")
    FluxPipeline(**flux_parts(root / "parts-schnell", guidance_embeds=False)).save_pretrained(
        root / "schnell"
    )
    return root


def diffusers_image(cls, folder, scheduler=None, **call) -> np.ndarray:
    pipe = cls.from_pretrained(folder)
    if scheduler is not None:
        pipe.scheduler = scheduler(pipe.scheduler)
    pipe.set_progress_bar_config(disable=True)
    seed = call.pop("seed")
    out = pipe(
        PROMPT,
        height=32,
        width=32,
        num_inference_steps=3,
        generator=[torch.Generator().manual_seed(seed)],
        output_type="np",
        **call,
    )
    return out.images[0]


def gen_image(folder, **options) -> np.ndarray:
    image = generate(PROMPT, model=str(folder), **{**FP32, **options})[0]
    return np.asarray(image, dtype=np.float32) / 255


def flow_solver(cls):
    """A multistep solver on flow sigmas, as gen's "dpm++_2m" / "unipc" make it from the model's scheduler."""

    def make(own):
        extra = (
            {"algorithm_type": "dpmsolver++", "solver_order": 2} if cls is DPMSolverMultistepScheduler else {}
        )
        return cls.from_config(
            own.config,
            use_flow_sigmas=True,
            prediction_type="flow_prediction",
            flow_shift=own.config.shift,
            **extra,
        )

    return make


def close(ours: np.ndarray, theirs: np.ndarray) -> None:
    """gen's PIL image (8 bits) against diffusers' float image: within one level of rounding."""
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1 / 255 + TOLERANCE


@pytest.mark.parametrize(
    ("sampler", "scheduler"),
    [
        (None, None),
        ("dpm++_2m", flow_solver(DPMSolverMultistepScheduler)),
        ("unipc", flow_solver(UniPCMultistepScheduler)),
    ],
)
def test_sd3_through_generate_equals_diffusers(folders, sampler, scheduler):
    """The request's defaults on SD3 are StableDiffusion3Pipeline's (CFG 7 with an empty negative); A1111's
    sampler names make diffusers' solvers on flow sigmas with the model's shift."""
    theirs = diffusers_image(StableDiffusion3Pipeline, folders / "sd3", scheduler, seed=4)
    close(gen_image(folders / "sd3", seed=4, sampler=sampler), theirs)
    negative = diffusers_image(
        StableDiffusion3Pipeline, folders / "sd3", seed=4, negative_prompt="blue", guidance_scale=3.0
    )
    close(gen_image(folders / "sd3", seed=4, negative="blue", guidance=3.0), negative)


def test_flux_guidances_follow_forge(folders):
    """Flux: CFG (--guidance) off by default and the distilled guidance 3.5, FluxPipeline's defaults; CFG > 1 is
    real CFG on the negative prompt (true_cfg_scale); --distilled-guidance is FluxPipeline's guidance_scale."""
    folder = folders / "flux"
    close(gen_image(folder, seed=2), diffusers_image(FluxPipeline, folder, seed=2))
    close(
        gen_image(folder, seed=2, distilled_guidance=6.0),
        diffusers_image(FluxPipeline, folder, seed=2, guidance_scale=6.0),
    )
    close(
        gen_image(folder, seed=2, guidance=3.0, negative="blue"),
        diffusers_image(FluxPipeline, folder, seed=2, true_cfg_scale=3.0, negative_prompt="blue"),
    )
    close(  # Forge's CFG > 1 without a negative: the empty prompt
        gen_image(folder, seed=2, guidance=3.0),
        diffusers_image(FluxPipeline, folder, seed=2, true_cfg_scale=3.0, negative_prompt=""),
    )


def test_schnell_ignores_a_distilled_guidance_and_says_so(folders, caplog):
    folder = folders / "schnell"
    plain = gen_image(folder, seed=1)
    assert np.array_equal(gen_image(folder, seed=1, distilled_guidance=7.0), plain)
    assert "distilled guidance 7 is Flux-dev's; not applied to Flux-schnell" in caplog.text


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_cli_metadata_and_reproduce_verify(folders, tmp_path, family, capsys):
    out = tmp_path / f"{family}.png"
    args = [PROMPT, "--model", str(folders / family), "-o", str(out), "--seed", "3", "--sampler", "heun"]
    assert main([*args, "--dtype", "fp32", "--width", "32", "--height", "32", "--steps", "3"]) == 0
    text = Image.open(out).text["parameters"]
    cfg = {"sd3": "CFG scale: 7.0", "flux": "CFG scale: 1.0, Distilled CFG Scale: 3.5"}[family]
    assert "Sampler: Heun" in text and cfg in text and "Seed: 3" in text and "Size: 32x32" in text
    capsys.readouterr()
    assert main(["reproduce", str(out), "--verify"]) == 0
    assert "max pixel difference: 0" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("family", "args", "message"),
    [
        ("flux", ["--sampler", "ddim"], "sampler 'ddim' is not defined for flow-matching models (SD3, Flux)"),
        ("sd3", ["--sampler", "dpm2_a"], "sampler 'dpm2_a' is not defined for flow-matching models"),
        ("sd3", ["--hires-scale", "2"], "hires fix is not available for SD3 models yet"),
        ("flux", ["--guidance-rescale", "0.5"], "--guidance-rescale is not available for Flux models yet"),
        (
            "flux",
            ["--guidance-interval", "0,0.5"],
            "--guidance-interval is not available for Flux models yet",
        ),
        ("sd3", ["--attention", "math"], "attention 'math' is not available for SD3/Flux models here"),
        (
            "flux",
            ["--backend", "openvino", "--dtype", "fp32"],
            "backend 'openvino' does not run SD3/Flux models",
        ),
    ],
)
def test_what_these_families_cannot_do_is_one_line(folders, tmp_path, capsys, family, args, message):
    out = tmp_path / "x.png"
    code = main([PROMPT, "--model", str(folders / family), "-o", str(out), "--steps", "2", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and not out.exists()
    assert any(message in line for line in err), err
    assert not any("Traceback" in line for line in err)


def init_picture(path) -> str:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_cli_image_to_image_equals_diffusers(folders, tmp_path, family, capsys):
    """--init-image on SD3 and Flux: diffusers' Img2Img pipeline on the same folder, at the image's own size (40x48),
    with the request's guidances; the PNG records the strength and reproduces."""
    picture, out = init_picture(tmp_path / "init.png"), tmp_path / "out.png"
    args = ["--model", str(folders / family), "--init-image", picture, "--strength", "0.6", "--seed", "2"]
    assert main([PROMPT, *args, "--steps", "4", "--dtype", "fp32", "-o", str(out)]) == 0
    cls = {"sd3": StableDiffusion3Img2ImgPipeline, "flux": FluxImg2ImgPipeline}[family]
    pipe = cls.from_pretrained(folders / family)
    pipe.set_progress_bar_config(disable=True)
    guidance = {"sd3": {"guidance_scale": 7.0}, "flux": {"guidance_scale": 3.5}}[family]
    theirs = pipe(
        PROMPT, image=Image.open(picture), strength=0.6, num_inference_steps=4, height=48, width=40,
        generator=[torch.Generator().manual_seed(2)], output_type="np", **guidance,
    ).images[0]  # fmt: skip
    ours = np.asarray(Image.open(out).convert("RGB"), dtype=np.float32) / 255
    close(ours, theirs)
    assert "Denoising strength: 0.6" in Image.open(out).text["parameters"]
    capsys.readouterr()
    assert main(["reproduce", str(out), "--verify"]) == 0


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_cli_inpainting_repaints_only_the_mask(folders, tmp_path, family, capsys):
    """--mask on SD3 and Flux: inside the mask repainted, outside it (beyond the blur) the picture itself, pasted
    back as for SD; A1111's keys in the PNG; reproduced."""
    picture, out = init_picture(tmp_path / "init.png"), tmp_path / "out.png"
    m = np.zeros((48, 40), np.uint8)
    m[12:36, 8:32] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    args = ["--model", str(folders / family), "--init-image", picture, "--mask", str(tmp_path / "mask.png")]
    assert main([PROMPT, *args, "--seed", "4", "--steps", "4", "--dtype", "fp32", "-o", str(out)]) == 0
    made = np.asarray(Image.open(out).convert("RGB")).astype(int)
    source = np.asarray(Image.open(picture).convert("RGB")).astype(int)
    far = np.asarray(Image.fromarray(m).filter(ImageFilter.GaussianBlur(4))) == 0  # beyond the blurred edge
    assert far.sum() > 200 and np.array_equal(made[far], source[far])
    assert np.abs(made[16:32, 12:28] - source[16:32, 12:28]).mean() > 10  # repainted
    assert "Mask blur: 4" in Image.open(out).text["parameters"]
    capsys.readouterr()
    assert main(["reproduce", str(out), "--verify"]) == 0


def test_served_a1111_openai_and_jobs_equal_the_cli(folders, tmp_path):
    """A Forge client's Flux request (cfg_scale 1, distilled_cfg_scale, sampler "Euler", scheduler "Simple"
    left to the model), OpenAI's and the jobs API's give the CLI's images, and PNGs that reproduce."""
    import openai

    from gen.serve.models import Models
    from tests.serve_support import cli_image, png, serving, wait_until

    models = Models.load(
        [str(folders / "flux"), str(folders / "sd3")], device="cpu", dtype="fp32", attention="sdpa"
    )
    forge = {
        "prompt": PROMPT,
        "seed": 5,
        "steps": 3,
        "width": 32,
        "height": 32,
        "cfg_scale": 1,
        "distilled_cfg_scale": 5.0,
        "sampler_name": "Euler",
        "batch_size": 2,
    }
    with serving(models=models) as server, server.client() as http:
        answer = http.post("/sdapi/v1/txt2img", json=forge)
        assert answer.status_code == 200, answer.text
        second = png(answer.json()["images"][1])
        runs = {m["name"]: m["samplers"] for m in http.get("/gen/v1/info").json()["models"]}
        assert {"euler", "euler_beta", "euler_a_simple"} <= set(runs["flux"]) and "ddim" not in runs["flux"]
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        made = client.images.generate(
            prompt=PROMPT,
            model="sd3",
            size="32x32",
            response_format="b64_json",
            extra_body={"seed": 8, "steps": 3},
        )
        job = http.post(
            "/gen/v1/jobs",
            json={
                "prompt": PROMPT,
                "model": "sd3",
                "seed": 9,
                "steps": 3,
                "width": 32,
                "height": 32,
                "distilled_guidance": 3.5,
            },
        )
        assert job.status_code == 202, job.text
        url = f"/gen/v1/jobs/{job.json()['id']}"
        wait_until(lambda: http.get(url).json()["status"] in ("done", "failed"), timeout=120)
        done = http.get(url).json()
        assert done["status"] == "done", done
        job_png = Image.open(io.BytesIO(http.get(done["images"][0]["url"]).content))
    common = ["--steps", "3", "--width", "32", "--height", "32", "--dtype", "fp32"]
    flux = cli_image(
        tmp_path,
        PROMPT,
        6,
        "--model",
        str(folders / "flux"),
        "--distilled-guidance",
        "5",
        "--sampler",
        "euler",
        *common,
    )
    assert_same_image(second, flux)
    assert "Distilled CFG Scale: 5.0" in second.text["parameters"]
    served = tmp_path / "served.png"
    served.write_bytes(base64.b64decode(answer.json()["images"][1]))
    assert main(["reproduce", str(served), "--verify"]) == 0
    sd3 = cli_image(tmp_path, PROMPT, 8, "--model", str(folders / "sd3"), *common)
    assert_same_image(png(made.data[0].b64_json), sd3)
    assert_same_image(job_png, cli_image(tmp_path, PROMPT, 9, "--model", str(folders / "sd3"), *common))
