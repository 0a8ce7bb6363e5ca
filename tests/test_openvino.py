"""The OpenVINO backend (gen.loading.backend) on tiny parts built in code: the same pictures as the torch backend
within the stated tolerance (a UNet, SDXL's, gen's DiT; text-to-image and image-to-image through the converted
VAE encoder), the converted models read back from the cache by a second load, ControlNet's residuals still
reaching the UNet, and the refusals in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gen.cli import main
from gen.loading.pipeline import load_pipeline
from gen.pipelines import ControlNetPipeline, ImageToImagePipeline
from tests import components
from tests.images import assert_same_image, pixels

pytest.importorskip("openvino")

# f32 OpenVINO against torch fp32: kernels differ (measured max |diff| on [0, 1] pictures ~1e-6 on these parts)
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("ov")
    tokenizer = components.write_tokenizer(d / "tok")
    components.pipeline(tokenizer, "unet").save_pretrained(d / "unet")
    components.pipeline(tokenizer).save_pretrained(d / "dit")
    components.sdxl_pipeline(d / "xl-parts").save_pretrained(d / "xl")
    return d


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "ov-cache"))


def images(pipe, **kwargs) -> np.ndarray:
    generator = [torch.Generator().manual_seed(k) for k in range(2)]
    kwargs = {"num_inference_steps": 4, "guidance_scale": 5.0, "output_type": "np", **kwargs}
    return pipe(["a red circle", "a blue square"], generator=generator, **kwargs).images


@pytest.mark.parametrize("model", ["unet", "dit", "xl"])
def test_same_pictures_as_torch_and_a_second_load_reads_the_cache(folders, model):
    torch_pipe = load_pipeline(str(folders / model))
    ov_pipe = load_pipeline(str(folders / model), backend="openvino")
    assert ov_pipe._openvino[ov_pipe.denoiser_name] == "converted"
    a, b = images(torch_pipe), images(ov_pipe)
    assert a.shape == b.shape and np.abs(a - b).max() < TOLERANCE, np.abs(a - b).max()
    wide = images(ov_pipe, height=48, width=32)  # another shape: compiled once more
    assert np.abs(wide - images(torch_pipe, height=48, width=32)).max() < TOLERANCE
    again = load_pipeline(str(folders / model), backend="openvino")
    assert again._openvino == {
        **ov_pipe._openvino,
        **{k: "cached" for k in ov_pipe._openvino if k != "precision"},
    }
    assert np.array_equal(images(again), b)  # the cached conversion is the same model


def test_bf16_after_f32_compiles_its_own_blobs(folders, tmp_path_factory):
    # openvino's blob cache ignores the precision hint: in one folder a bf16 compile read the f32 blob and gave
    # NaN (SD 1.5 UNet, Intel AMX). Each precision has its own folder, and bf16 pictures stay near fp32's.
    fp32 = images(load_pipeline(str(folders / "unet"), backend="openvino"))
    bf16 = images(load_pipeline(str(folders / "unet"), torch_dtype=torch.bfloat16, backend="openvino"))
    assert np.isfinite(bf16).all() and np.abs(bf16 - fp32).max() < 0.1, np.abs(bf16 - fp32).max()
    blobs = tmp_path_factory.getbasetemp() / "ov-cache" / "gen" / "openvino" / "blobs"
    assert {p.name for p in blobs.iterdir()} >= {"f32", "bf16"} and any((blobs / "bf16").iterdir())


def test_image_to_image_runs_the_converted_encoder(folders):
    picture = Image.new("RGB", (32, 32), "navy")
    made = []
    for backend in ("torch", "openvino"):
        pipe = ImageToImagePipeline.from_pipe(load_pipeline(str(folders / "unet"), backend=backend))
        made.append(images(pipe, image=picture, strength=0.6))
    assert np.abs(made[0] - made[1]).max() < TOLERANCE


@pytest.mark.parametrize("model", ["unet", "xl"])
def test_text_encoders_run_converted_with_clip_skip_and_fall_back_when_the_vocabulary_grows(folders, model):
    from gen.text.encode import embed, embed_penultimate

    torch_pipe = load_pipeline(str(folders / model))
    ov_pipe = load_pipeline(str(folders / model), backend="openvino")
    names = ["text_encoder", "text_encoder_2"] if model == "xl" else ["text_encoder"]
    assert all(ov_pipe._openvino[n] in ("converted", "cached") for n in names)
    prompts = ["a red circle", "a blue square " * 30]  # one chunk, and two
    for name in names:
        pair = [getattr(p, name) for p in (torch_pipe, ov_pipe)]
        tokenizer = torch_pipe.tokenizer if name == "text_encoder" else torch_pipe.tokenizer_2
        for clip_skip in (None, 1):
            a, b = (embed(tokenizer, e, prompts, "cpu", clip_skip=clip_skip) for e in pair)
            for x, y in zip([*a[0], a[1]], [*b[0], b[1]], strict=True):
                assert x.shape == y.shape and (x - y).abs().max() < TOLERANCE
        a, b = (embed_penultimate(tokenizer, e, prompts, "cpu") for e in pair)
        for x, y in zip([*a[0], a[1]], [*b[0], b[1]], strict=True):
            assert (x - y).abs().max() < TOLERANCE
        if a[2] is not None:  # SDXL's projected, pooled embedding
            assert (a[2] - b[2]).abs().max() < TOLERANCE
    # textual inversion grows the table: the torch weights come back and the grown encoder runs in torch
    from safetensors.torch import save_file

    vectors = torch.randn(
        1, ov_pipe.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(0)
    )
    save_file({"emb_params": vectors}, str(folders / f"style-{model}.safetensors"))
    for pipe in (torch_pipe, ov_pipe):
        pipe.load_textual_inversion(str(folders / f"style-{model}.safetensors"), token="<style>",
                                    text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)  # fmt: skip
    a, b = (
        embed(p.tokenizer, p.text_encoder, ["a <style> circle"], "cpu")[0][0] for p in (torch_pipe, ov_pipe)
    )
    assert torch.equal(a, b)


def test_torch_weights_are_released_and_come_back_for_a_torch_call(folders):
    from gen.text.encode import final_layer_norm

    pipe = load_pipeline(str(folders / "unet"), backend="openvino")
    sizes = {
        n: sum(p.numel() for p in getattr(pipe, n).parameters()) for n in ("unet", "vae", "text_encoder")
    }
    layer_norm = sum(p.numel() for p in final_layer_norm(pipe.text_encoder).parameters())
    assert sizes == {"unet": 0, "vae": 0, "text_encoder": layer_norm}, sizes  # kept: clip skip runs it
    before = images(pipe)
    assert np.abs(before - images(load_pipeline(str(folders / "unet")))).max() < TOLERANCE
    pipe._torch_weights.restore()
    assert sum(p.numel() for p in pipe.unet.parameters()) > 0
    assert np.array_equal(images(pipe), before)  # OpenVINO still runs it


def test_controlnet_residuals_still_reach_the_unet(folders):
    from tests.test_controlnet import control_image, controlnet

    net = controlnet()
    made = []
    for backend in ("torch", "openvino"):
        pipe = ControlNetPipeline.from_pipe(
            load_pipeline(str(folders / "unet"), backend=backend), controlnet=net
        )
        made.append(images(pipe, image=control_image()))
    plain = images(load_pipeline(str(folders / "unet"), backend="openvino"))
    assert np.abs(made[0] - made[1]).max() < TOLERANCE and np.abs(made[1] - plain).max() > 0.05


def test_cli_backend_reproduces(folders, tmp_path):
    out, torch_out = tmp_path / "ov.png", tmp_path / "pt.png"
    args = ["a red circle", "--model", str(folders / "dit"), "--seed", "2", "--steps", "4", "--quiet"]
    assert main([*args, "--backend", "openvino", "-o", str(out)]) == 0
    assert main([*args, "-o", str(torch_out)]) == 0
    assert_same_image(out, torch_out)  # within PIXEL_TOLERANCE
    assert main(["reproduce", str(out), "--verify"]) == 0
    from gen.generation import metadata

    assert metadata.read(out)["options"]["backend"] == "openvino"
    assert pixels(out).shape == (32, 32, 3)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--lora", "x.safetensors"],
            "backend 'openvino' runs the weights as converted: LoRA is not supported",
        ),
        (["--device", "cuda"], "backend 'openvino' runs on the CPU here; got device 'cuda'"),
        (["--dtype", "fp16"], "dtype fp16 is ~10x slower than fp32 on a CPU"),
        (["--backend", "tensorrt"], "argument --backend: invalid choice: 'tensorrt'"),
    ],
)
def test_bad_backend_requests_are_one_line(tmp_path, capsys, argv, message):
    backend = [] if "--backend" in argv else ["--backend", "openvino"]
    assert main(["x", "-o", str(tmp_path / "x.png"), *backend, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_missing_package_names_the_extra(monkeypatch):
    import importlib.util

    from gen.loading.precision import check_backend

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a)
    )
    with pytest.raises(
        ValueError, match=r"backend 'openvino' needs the openvino package: pip install 'gen\[openvino\]'"
    ):
        check_backend("openvino", "fp32", "cpu")


def test_served_with_the_backend_equals_the_cli(folders, tmp_path):
    from gen.serve.models import Models
    from tests.serve_support import cli_image, png, serving

    models = Models.load(
        [str(folders / "dit")], device="cpu", dtype="fp32", attention="sdpa", backend="openvino"
    )
    body = {"prompt": "a red circle", "seed": 5, "steps": 4}
    with serving(models=models, backend="openvino") as server, server.client() as c:
        answer = c.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200, answer.text
    served = png(answer.json()["images"][0])
    cli = cli_image(
        tmp_path, "a red circle", 5, "--model", str(folders / "dit"), "--steps", "4", "--backend", "openvino"
    )
    assert_same_image(served, cli, exact=True)


def test_gen_eval_judges_the_images_the_backend_makes(monkeypatch, capsys):
    """`gen eval --backend openvino` scores OpenVINO's pictures of the embedded model; in f32 they are torch's,
    so every accuracy is the same as the torch run's (bf16's adherence is the benchmark's, README)."""
    import json

    import gen.evaluation as ev

    small = ev.eval_scenes(3)  # the plumbing is under test here, not the model
    monkeypatch.setattr(ev, "eval_scenes", lambda per_split=20, seed=4242: small)
    loaded, load_judged = [], ev.load_judged

    def spy(*args):
        folder, pipe, judge = load_judged(*args)
        loaded.append(getattr(pipe, "_openvino", None))
        return folder, pipe, judge

    monkeypatch.setattr(ev, "load_judged", spy)
    argv = ["eval", "--images-per-prompt", "1", "--steps", "4", "--json", "--no-baseline", "--no-styles"]
    reports = {}
    for backend in ("torch", "openvino"):
        assert main([*argv, "--backend", backend]) == 0
        reports[backend] = json.loads(capsys.readouterr().out)
    assert reports["openvino"]["backend"] == "openvino" and reports["torch"]["backend"] == "torch"
    assert loaded[0] is None and loaded[1]["transformer"] in ("converted", "cached")  # OpenVINO made them
    assert reports["openvino"]["cfg 5"]["accuracy"] == reports["torch"]["cfg 5"]["accuracy"]
    assert main(["eval", "--task", "img2img", "--backend", "openvino"]) == 2
    assert "--backend openvino judges text-to-image only" in capsys.readouterr().err
