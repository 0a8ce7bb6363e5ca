"""SD3 and Flux transformer single files (Stability's and Black Forest Labs' key layouts) with a diffusers folder
for the other parts: detected from their keys, converted by diffusers' own converter offline, the same images as
the folder itself; SD3's export is checked by the round trip; misfits are one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, SD3Transformer2DModel, StableDiffusion3Pipeline
from safetensors.torch import save_file

from gen.cli import main
from gen.loading.pipeline import load_pipeline
from gen.pipelines.flow_export import export_sd3
from gen.pipelines.flow_single_file import PREFIX, flow_family
from tests.flow_parts import flux_parts, sd3_parts

PROMPT = "a red circle"
CALL = {"prompt": PROMPT, "num_inference_steps": 3, "height": 32, "width": 32, "output_type": "np"}


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """A tiny SD3 folder, and its transformer as Stability's single file (with a second, retrained-looking copy)."""
    root = tmp_path_factory.mktemp("flow-single")
    parts = sd3_parts(root / "parts")
    StableDiffusion3Pipeline(**parts).save_pretrained(root / "sd3")
    save_file(export_sd3(parts["transformer"]), str(root / "sd3_transformer.safetensors"))
    torch.manual_seed(5)
    other = SD3Transformer2DModel.from_config(parts["transformer"].config)  # other weights, same architecture
    save_file(export_sd3(other), str(root / "finetune.safetensors"))
    return root


def images(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(**CALL, generator=torch.Generator().manual_seed(0)).images


def test_export_round_trips_through_diffusers_converter(sd3):
    loaded = load_pipeline(sd3 / "sd3_transformer.safetensors", base=sd3 / "sd3").transformer
    original = SD3Transformer2DModel.from_pretrained(sd3 / "sd3", subfolder="transformer")
    theirs, ours = original.state_dict(), loaded.state_dict()
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert all(k.startswith(PREFIX) for k in export_sd3(original))


def test_a_finetuned_file_gives_diffusers_images(sd3):
    """The file's weights, the folder's other parts: diffusers' from_single_file with the folder's config."""
    ours = load_pipeline(sd3 / "finetune.safetensors", base=sd3 / "sd3")
    transformer = SD3Transformer2DModel.from_single_file(
        str(sd3 / "finetune.safetensors"),
        config=str(sd3 / "sd3"),
        subfolder="transformer",
        local_files_only=True,
    )
    theirs = StableDiffusion3Pipeline.from_pretrained(sd3 / "sd3", transformer=transformer)
    assert np.abs(images(ours) - images(theirs)).max() < 1e-4
    assert (
        np.abs(images(ours) - images(load_pipeline(sd3 / "sd3"))).max() > 1e-3
    )  # the file's weights, not the folder's


def test_the_gen_command_runs_a_file_and_reproduces(sd3, tmp_path, capsys):
    out = tmp_path / "x.png"
    args = [PROMPT, "--model", str(sd3 / "finetune.safetensors"), "--base", str(sd3 / "sd3"), "-o", str(out)]
    assert (
        main([*args, "--steps", "3", "--width", "32", "--height", "32", "--dtype", "fp32", "--seed", "1"])
        == 0
    )
    capsys.readouterr()
    assert main(["reproduce", str(out), "--verify"]) == 0
    moved = tmp_path / "moved-base"  # the base folder moved since: --base says where it is now
    __import__("shutil").copytree(sd3 / "sd3", moved)
    assert main(["reproduce", str(out), "--verify", "--base", str(moved)]) == 0
    assert main(["reproduce", str(out), "--base", str(tmp_path / "nowhere")]) != 0


def test_detection(sd3, tmp_path):
    assert flow_family(sd3 / "sd3_transformer.safetensors") == "sd3"
    flux = {
        "double_blocks.0.img_attn.qkv.weight": torch.zeros(1),
        "single_blocks.0.linear1.weight": torch.zeros(1),
    }
    save_file({PREFIX + k: v for k, v in flux.items()}, str(tmp_path / "flux.safetensors"))
    assert flow_family(tmp_path / "flux.safetensors") == "flux"
    save_file(
        {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(tmp_path / "sd15.safetensors")
    )
    assert flow_family(tmp_path / "sd15.safetensors") is None
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    assert flow_family(tmp_path / "broken.safetensors") is None


def flux_file(tmp_path, guidance: bool):
    """A Flux.1-shaped key set (1 double, 1 single block), guidance embedding or not: enough for the checks."""
    keys = ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "img_in.weight"]
    keys += ["guidance_in.in_layer.weight"] if guidance else []
    path = tmp_path / ("dev.safetensors" if guidance else "schnell.safetensors")
    save_file({k: torch.zeros(1) for k in keys}, str(path))
    return path


def test_misfits_are_one_line(sd3, tmp_path):
    FluxPipeline(**flux_parts(tmp_path / "parts", guidance_embeds=False)).save_pretrained(
        tmp_path / "schnell"
    )
    cases = [
        (sd3 / "finetune.safetensors", None, "is an SD3 transformer file without VAE, CLIP-L, CLIP-G; give the part files"),
        (sd3 / "finetune.safetensors", tmp_path / "schnell", "is a FluxTextToImagePipeline folder; finetune.safetensors needs an SD3 folder"),
        (flux_file(tmp_path, True), tmp_path / "schnell", "guidance_embeds is Flux-dev (guidance embedding) in the file and Flux-schnell (none) in the folder's config"),
        (sd3 / "finetune.safetensors", tmp_path / "nowhere", "not a diffusers pipeline folder"),
    ]  # fmt: skip
    for path, base, message in cases:
        with pytest.raises(
            (ValueError, FileNotFoundError), match=message.replace("(", r"\(").replace(")", r"\)")
        ) as e:
            load_pipeline(path, base=base)
        assert "\n" not in str(e.value)


def test_gen_serve_serves_a_file_with_the_base_that_fits_it(sd3, tmp_path):
    """`gen serve --model finetune.safetensors --model sd3-folder --base flux-folder --base sd3-folder`: the SD3
        file takes the SD3 base (the Flux one is passed over), its A1111 images are the CLI's `--model file --base`
        ones, and its PNGs name the base, so they reproduce; a file with no folder of its family and no parts of its own
    is refused in one line."""
    from gen.serve.models import Models
    from tests.images import assert_same_image
    from tests.serve_support import cli_image, png, serving

    FluxPipeline(**flux_parts(tmp_path / "parts")).save_pretrained(tmp_path / "flux")
    bases = [str(tmp_path / "flux"), str(sd3 / "sd3")]
    file = str(sd3 / "finetune.safetensors")
    models = Models.load([file, str(sd3 / "sd3")], "cpu", "fp32", "sdpa", bases=bases)
    assert [m.name for m in models] == ["finetune", "sd3"]
    call = {"prompt": PROMPT, "seed": 4, "steps": 3, "width": 32, "height": 32}  # the first model: the file
    with serving(models=models) as server, server.client() as http:
        answer = http.post("/sdapi/v1/txt2img", json=call)
        assert answer.status_code == 200, answer.text
    common = ["--steps", "3", "--width", "32", "--height", "32", "--dtype", "fp32", "--cfg", "7"]
    cli = cli_image(tmp_path, PROMPT, 4, "--model", file, "--base", str(sd3 / "sd3"), *common)
    assert_same_image(png(answer.json()["images"][0]), cli)
    served = tmp_path / "served.png"
    served.write_bytes(__import__("base64").b64decode(answer.json()["images"][0]))
    assert main(["reproduce", str(served), "--verify"]) == 0
    with pytest.raises(
        ValueError, match="finetune.safetensors is an SD3 transformer file without VAE, CLIP-L, CLIP-G"
    ) as e:  # no SD3 folder among the bases: the shipped configs stand in, and the file carries no parts
        Models.load([file], "cpu", "fp32", "sdpa", bases=[str(tmp_path / "flux")])
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_a_flux1_wide_file_round_trips_through_diffusers_converter(tmp_path):
    """A transformer as wide as Flux.1's (3072, 24 heads of 128: diffusers' converter splits at that width), one
    double and one single block, in bf16: gen's export in BFL's layout loads through gen.load_pipeline as the
    very same weights. (~0.5 B parameters: the one real-width Flux check that fits here.)"""
    import json

    from diffusers import FluxTransformer2DModel

    from gen.pipelines.flow_export import export_flux

    parts = flux_parts(tmp_path / "parts")
    FluxPipeline(**parts).save_pretrained(tmp_path / "flux")
    torch.manual_seed(0)
    wide = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=parts["transformer"].config.joint_attention_dim,
        pooled_projection_dim=16,
        axes_dims_rope=[16, 56, 56],
        guidance_embeds=True,
    ).to(torch.bfloat16)
    config = (
        tmp_path / "flux" / "transformer" / "config.json"
    )  # the folder gives the config; no weights needed
    config.write_text(json.dumps(dict(wide.config)))
    for weights in config.parent.glob("*.safetensors"):
        weights.unlink()
    save_file(export_flux(wide), str(tmp_path / "flux1-wide.safetensors"))
    loaded = load_pipeline(
        tmp_path / "flux1-wide.safetensors", base=tmp_path / "flux", torch_dtype=torch.bfloat16
    )
    theirs, ours = wide.state_dict(), loaded.transformer.state_dict()
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)
    with pytest.raises(
        ValueError, match="export_flux writes Flux.1's width .3072.; this transformer is 32 wide"
    ):
        export_flux(parts["transformer"])
