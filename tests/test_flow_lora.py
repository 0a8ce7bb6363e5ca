"""LoRA on SD3 and Flux: a diffusers-format file gives diffusers' images through gen's checks."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from gen.pipelines import FluxTextToImagePipeline, SD3TextToImagePipeline
from tests.flow_parts import flux_parts, sd3_parts
from tests.test_flow import TOLERANCE, difference

FAMILIES = {
    "sd3": (sd3_parts, SD3TextToImagePipeline, StableDiffusion3Pipeline),
    "flux": (flux_parts, FluxTextToImagePipeline, FluxPipeline),
}


def lora_file(family: str, folder) -> str:
    """A LoRA on the transformer's attention and the first CLIP, random (seeded) so it changes the picture,
    saved by diffusers' save_lora_weights."""
    build, _, ref_cls = FAMILIES[family]
    parts = build(folder / "source")
    torch.manual_seed(1)
    config = LoraConfig(
        r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
    )
    parts["transformer"].add_adapter(config)
    parts["text_encoder"].add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    layers = {
        "transformer_lora_layers": get_peft_model_state_dict(parts["transformer"]),
        "text_encoder_lora_layers": get_peft_model_state_dict(parts["text_encoder"]),
    }
    ref_cls.save_lora_weights(folder / "lora", **layers)
    return str(folder / "lora" / "pytorch_lora_weights.safetensors")


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_equals_diffusers(tmp_path, family):
    build, gen_cls, ref_cls = FAMILIES[family]
    path = lora_file(family, tmp_path)
    parts = build(tmp_path / "parts")
    ours = gen_cls(**copy.deepcopy(parts))
    theirs = ref_cls(**copy.deepcopy(parts))
    plain = gen_cls(**parts)
    for pipe in (ours, theirs, plain):
        pipe.set_progress_bar_config(disable=True)
    assert ours.load_lora_weights(path, adapter_name="style") == "style"
    theirs.load_lora_weights(path, adapter_name="style")
    assert difference((ours, theirs)) < TOLERANCE
    assert difference((ours, plain)) > 0.01  # the LoRA changes the picture
    half = {"joint_attention_kwargs": {"scale": 0.5}}
    assert difference((ours, theirs), **half) < TOLERANCE
    ours.fuse_lora()  # diffusers' adapter API on gen's pipeline
    theirs.fuse_lora()
    assert difference((ours, theirs)) < 1e-3


def test_lora_refusals_are_one_line(tmp_path):
    path = lora_file("sd3", tmp_path)
    flux = FluxTextToImagePipeline(**flux_parts(tmp_path / "flux"))
    with pytest.raises(ValueError, match="does not fit this FluxTransformer2DModel") as error:
        flux.load_lora_weights(path)
    assert "\n" not in str(error.value)
    pickle = tmp_path / "lora.bin"
    pickle.write_bytes(b"not read")
    with pytest.raises(ValueError, match="only .safetensors LoRA files"):
        flux.load_lora_weights(str(pickle))


def test_misfit_lora_is_refused_with_diffusers_quieted(tmp_path):
    """gen's CLI sets diffusers' logging to errors only; the misfit check must not depend on that setting."""
    from diffusers.utils import logging as dlog

    path = lora_file("sd3", tmp_path)
    flux = FluxTextToImagePipeline(**flux_parts(tmp_path / "flux"))
    before = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        with pytest.raises(ValueError, match="does not fit this FluxTransformer2DModel"):
            flux.load_lora_weights(path)
    finally:
        dlog.set_verbosity(before)
    assert not getattr(flux.transformer, "peft_config", None)  # nothing of it left on the model


# A kohya (sd-scripts) Flux LoRA as its trainers write it: BFL module names, lora_down/lora_up, an alpha per module,
# fused qkv. Single blocks' linear1 is left out: diffusers' converter splits it at the real Flux widths
# (3072 x 3 + 12288), which a tiny transformer cannot have.
KOHYA_FLUX = {  # kohya module -> (in, out) of the tiny Flux in tests.flow_parts (inner 32, MLP 128, CLIP 16)
    "lora_unet_double_blocks_0_img_attn_qkv": (32, 96),
    "lora_unet_double_blocks_0_img_attn_proj": (32, 32),
    "lora_unet_double_blocks_0_txt_attn_qkv": (32, 96),
    "lora_unet_double_blocks_0_img_mlp_0": (32, 128),
    "lora_unet_single_blocks_0_linear2": (160, 32),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (16, 16),
    # diffusers tells a kohya CLIP part's layout by its out_proj: a file of q_proj alone fails there too
    "lora_te1_text_model_encoder_layers_0_self_attn_out_proj": (16, 16),
}


def kohya_flux_state(rank: int = 4, alpha: float = 2.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    state = {}
    for module, (n_in, n_out) in KOHYA_FLUX.items():
        state[f"{module}.lora_down.weight"] = torch.randn(rank, n_in, generator=generator) * 0.3
        state[f"{module}.lora_up.weight"] = torch.randn(n_out, rank, generator=generator) * 0.3
        state[f"{module}.alpha"] = torch.tensor(alpha)
    return state


def comfy_name(kohya_key: str) -> str:
    """The same module as ComfyUI writes it: diffusion_model.<dotted BFL name> and text_encoders.clip_l."""
    module, _, tail = kohya_key.partition(".")
    dotted = {
        "lora_unet_double_blocks_0_img_attn_qkv": "diffusion_model.double_blocks.0.img_attn.qkv",
        "lora_unet_double_blocks_0_img_attn_proj": "diffusion_model.double_blocks.0.img_attn.proj",
        "lora_unet_double_blocks_0_txt_attn_qkv": "diffusion_model.double_blocks.0.txt_attn.qkv",
        "lora_unet_double_blocks_0_img_mlp_0": "diffusion_model.double_blocks.0.img_mlp.0",
        "lora_unet_single_blocks_0_linear2": "diffusion_model.single_blocks.0.linear2",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (
            "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"
        ),
        "lora_te1_text_model_encoder_layers_0_self_attn_out_proj": (
            "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.out_proj"
        ),
    }[module]
    return f"{dotted}.{tail}"


def test_kohya_and_comfyui_flux_loras_equal_diffusers(tmp_path):
    from safetensors.torch import save_file

    kohya = kohya_flux_state()
    files = {"kohya": tmp_path / "kohya.safetensors", "comfyui": tmp_path / "comfyui.safetensors"}
    save_file(kohya, files["kohya"])
    save_file({comfy_name(k): v for k, v in kohya.items()}, files["comfyui"])
    parts = flux_parts(tmp_path / "parts")
    plain = FluxTextToImagePipeline(**copy.deepcopy(parts))
    plain.set_progress_bar_config(disable=True)
    loaded = {}
    for layout, path in files.items():
        ours = FluxTextToImagePipeline(**copy.deepcopy(parts))
        theirs = FluxPipeline(**copy.deepcopy(parts))
        for pipe in (ours, theirs):
            pipe.set_progress_bar_config(disable=True)
        ours.load_lora_weights(str(path), adapter_name=layout)
        theirs.load_lora_weights(str(path), adapter_name=layout)
        # every module of the file landed: the transformer's five (qkv split in three) and the CLIP's one
        assert "lora_A" in str(ours.transformer.transformer_blocks[0].attn.to_q)
        assert "lora_A" in str(ours.transformer.single_transformer_blocks[0].proj_out)
        assert "lora_A" in str(ours.text_encoder.encoder.layers[0].self_attn.q_proj)
        assert difference((ours, theirs)) < TOLERANCE, layout
        loaded[layout] = ours
    assert difference((loaded["kohya"], loaded["comfyui"])) < TOLERANCE  # one LoRA, two spellings
    assert difference((loaded["kohya"], plain)) > 0.01  # and it changes the picture


def test_a_kohya_sd3_lora_is_refused_not_ignored(tmp_path):
    """diffusers has no converter for kohya-named SD3 LoRAs; its loader finds no key it knows and goes on, so
    gen refuses the file in one line rather than run the model unchanged."""
    from safetensors.torch import save_file

    path = tmp_path / "sd3_kohya.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.randn(4, 32, generator=g),
            "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.randn(96, 4, generator=g),
            "lora_unet_joint_blocks_0_x_block_attn_qkv.alpha": torch.tensor(4.0),
        },
        path,
    )
    sd3 = SD3TextToImagePipeline(**sd3_parts(tmp_path / "sd3"))
    with pytest.raises(
        ValueError, match="sd3_kohya.safetensors .* names no layer of the transformer"
    ) as error:
        sd3.load_lora_weights(str(path))
    assert "\n" not in str(error.value)
    assert not getattr(sd3.transformer, "peft_config", None)


def test_a_lora_that_would_load_in_part_is_refused(tmp_path):
    """A diffusers-format SD3 file with one kohya-named module beside: diffusers loads the first and drops the
    other without a word; gen refuses the file and leaves the model as it was."""
    from safetensors.torch import load_file, save_file

    state = load_file(lora_file("sd3", tmp_path))
    state["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"] = torch.zeros(4, 32)
    state["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"] = torch.zeros(96, 4)
    mixed = tmp_path / "mixed.safetensors"
    save_file(state, mixed)
    sd3 = SD3TextToImagePipeline(**sd3_parts(tmp_path / "sd3"))
    with pytest.raises(ValueError, match="key 'lora_unet_joint_blocks_0_x_block_attn_qkv.lora_"):
        sd3.load_lora_weights(str(mixed))
    assert not getattr(sd3.transformer, "peft_config", None)
