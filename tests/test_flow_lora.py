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
