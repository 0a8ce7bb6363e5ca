"""All-in-one SD3 and Flux files (Stability's `sd3_medium_incl_clips*`, ComfyUI's checkpoints): the VAE and text
encoders a file carries are loaded from it, the folder giving only tokenizers and configs, and the images are
diffusers' from_single_file's on the same file."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from safetensors.torch import save_file

from gen.loading.pipeline import load_pipeline
from gen.pipelines.flow_export import export_sd3
from gen.pipelines.flow_single_file import PREFIX, load_packed, packed_parts
from gen.pipelines.single_file import clip_to_original, vae_to_original
from tests.flow_parts import flux_parts, sd3_parts

CALL = {"prompt": "a red circle", "num_inference_steps": 3, "height": 32, "width": 32, "output_type": "np"}


def t5_to_original(encoder, prefix: str = "text_encoders.t5xxl.transformer.") -> dict[str, torch.Tensor]:
    """T5 as SD3/ComfyUI files hold it: the encoder's own names under `prefix` (none in a separate t5xxl file), the
    token embedding once (`shared.weight`; transformers' tied encoder.embed_tokens is not written)."""
    state = encoder.state_dict()
    return {prefix + k: v.clone() for k, v in state.items() if k != "encoder.embed_tokens.weight"}


def packed_text(parts: dict, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """The text encoders `names` ({component: clip_l | clip_g | t5xxl}) under the all-in-one prefixes."""
    out = {}
    for name, part in names.items():
        encoder = parts[name]
        if part == "t5xxl":
            out |= t5_to_original(encoder)
        else:
            out |= clip_to_original(encoder, f"text_encoders.{part}.transformer.")
    return out


def config_only(folder, into):
    """The folder without weights: what a user keeps beside an all-in-one file (tokenizers and configs)."""
    shutil.copytree(folder, into, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return into


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """A tiny SD3 (CLIP-L 16 wide, CLIP-G 24, as the real ones differ) and its all-in-one file. CLIP-L's
    projection is the identity, which is what diffusers gives SD3 files' CLIP-L (they hold none)."""
    root = tmp_path_factory.mktemp("all-in-one")
    parts = sd3_parts(root / "parts", clip_g_width=24)
    with torch.no_grad():
        parts["text_encoder"].text_projection.weight.copy_(torch.eye(16))
    StableDiffusion3Pipeline(**parts).save_pretrained(root / "sd3")
    names = {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5xxl"}
    state = export_sd3(parts["transformer"]) | vae_to_original(parts["vae"]) | packed_text(parts, names)
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "sd3_all.safetensors"))
    config_only(root / "sd3", root / "configs")
    return root


def images(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(**CALL, generator=torch.Generator().manual_seed(0)).images


def test_the_file_carries_every_part(sd3):
    assert packed_parts(sd3 / "sd3_all.safetensors", "sd3") == [
        "vae",
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
    ]


def test_an_all_in_one_file_with_a_folder_of_configs_gives_the_models_images(sd3):
    """No weights in the folder: every part comes from the file, and the images are the original folder's and
    diffusers' StableDiffusion3Pipeline.from_single_file's on the same file."""
    ours = load_pipeline(sd3 / "sd3_all.safetensors", base=sd3 / "configs")
    original = load_pipeline(sd3 / "sd3")
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer"):
        theirs, mine = getattr(original, name).state_dict(), getattr(ours, name).state_dict()
        assert theirs.keys() == mine.keys(), name
        assert all(torch.equal(theirs[k], mine[k]) for k in theirs), name
    reference = StableDiffusion3Pipeline.from_single_file(
        str(sd3 / "sd3_all.safetensors"), config=str(sd3 / "sd3"), local_files_only=True
    )
    # diffusers' T5 from such a file is left training (dropout: random embeddings) and, the file holding the token
    # embedding once as Stability's and ComfyUI's do, with encoder.embed_tokens on the meta device: mended here
    t5 = reference.text_encoder_3
    assert t5.training and t5.encoder.embed_tokens.weight.is_meta
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    assert not any(getattr(ours, name).training for name in names)
    t5.tie_weights()
    t5.eval()
    assert np.abs(images(ours) - images(reference)).max() < 1e-4
    assert np.abs(images(ours) - images(original)).max() < 1e-4


def test_the_file_wins_over_the_folders_weights(sd3, tmp_path):
    """A folder with other weights for a part the file carries: the file's are used (the folder's are not read)."""
    other = sd3_parts(tmp_path / "parts", clip_g_width=24)
    torch.manual_seed(9)
    other["vae"] = type(other["vae"]).from_config(other["vae"].config)
    StableDiffusion3Pipeline(**other).save_pretrained(tmp_path / "other")
    ours = load_pipeline(sd3 / "sd3_all.safetensors", base=tmp_path / "other")
    want = load_pipeline(sd3 / "sd3").vae.state_dict()
    assert all(torch.equal(v, ours.vae.state_dict()[k]) for k, v in want.items())


def test_a_file_missing_weights_of_a_part_is_one_line(sd3, tmp_path):
    """A packed encoder cut short (a layer's weights gone) would leave meta tensors behind: named instead."""
    from safetensors.torch import load_file

    state = load_file(str(sd3 / "sd3_all.safetensors"))
    gone = [k for k in state if k.startswith("text_encoders.clip_g.transformer.text_model.encoder.layers.2.")]
    for k in gone:
        del state[k]
    save_file(state, str(tmp_path / "cut.safetensors"))
    with pytest.raises(ValueError, match="cut.safetensors: its text_encoder_2 lacks weights") as e:
        load_pipeline(tmp_path / "cut.safetensors", base=sd3 / "configs")
    assert "\n" not in str(e.value)


def test_flux_parts_come_from_the_file(tmp_path):
    """Flux's VAE (ComfyUI's `vae.` prefix), CLIP-L and T5 from the file, equal to the originals. (diffusers' Flux
    transformer converter is fixed to Flux.1's width, so the tiny transformer itself is not converted here.)"""
    parts = flux_parts(tmp_path / "parts")
    FluxPipeline(**parts).save_pretrained(tmp_path / "flux")
    names = {"text_encoder": "clip_l", "text_encoder_2": "t5xxl"}
    state = vae_to_original(parts["vae"], "vae.") | packed_text(parts, names)
    state[PREFIX + "double_blocks.0.img_attn.qkv.weight"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "flux_all.safetensors"))
    assert packed_parts(tmp_path / "flux_all.safetensors", "flux") == [
        "vae",
        "text_encoder",
        "text_encoder_2",
    ]
    loaded = load_packed(
        tmp_path / "flux_all.safetensors", config_only(tmp_path / "flux", tmp_path / "c"), "flux"
    )
    for name, module in loaded.items():
        want = parts[name].state_dict()
        got = module.state_dict()
        assert want.keys() <= got.keys(), name
        assert all(torch.equal(want[k], got[k]) for k in want), name


def test_an_fp8_t5_loads_in_the_asked_precision(tmp_path):
    """Stability's `..._t5xxlfp8` files store T5 in float8_e4m3fn: it loads as the fp8 values, in fp32."""
    parts = flux_parts(tmp_path / "parts")
    FluxPipeline(**parts).save_pretrained(tmp_path / "flux")
    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in t5_to_original(parts["text_encoder_2"]).items()}
    fp8[PREFIX + "double_blocks.0.img_attn.qkv.weight"] = torch.zeros(1)
    save_file(fp8, str(tmp_path / "fp8.safetensors"))
    t5 = load_packed(tmp_path / "fp8.safetensors", tmp_path / "flux", "flux")["text_encoder_2"]
    want = {k: v.to(torch.float8_e4m3fn).float() for k, v in parts["text_encoder_2"].state_dict().items()}
    got = t5.state_dict()
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], v) for k, v in want.items())
