import json

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor

from gen.models import DIT_PRESETS, DiT, dit_from_preset
from tests import components


def test_shapes_and_zero_init_output():
    model = DiT(
        sample_size=8,
        patch_size=2,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    out = model(x, torch.tensor([1, 500, 999]), torch.randn(3, 7, 16, generator=g)).sample
    assert out.shape == (3, 4, 8, 8)
    assert torch.count_nonzero(out) == 0  # adaLN-Zero + zero output layer: an untrained DiT predicts zeros


def test_other_resolution_and_scalar_timestep():
    model, g = components.dit(), torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 5, 32, generator=g)
    out = model(x, 10, c, return_dict=False)[0]
    assert out.shape == (2, 4, 8, 12)
    with pytest.raises(ValueError, match="not divisible by patch_size=2"):
        model(torch.randn(1, 4, 7, 8, generator=g), 10, torch.randn(1, 5, 32, generator=g))


def test_cross_attention_uses_text_and_mask():
    model, g = components.dit(), torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([300])
    a, b = torch.randn(1, 6, 32, generator=g), torch.randn(1, 6, 32, generator=g)
    assert not torch.allclose(model(x, t, a).sample, model(x, t, b).sample)
    # Masked-out text tokens must not influence the output.
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]])
    c = torch.cat([a[:, :3], b[:, 3:]], dim=1)
    torch.testing.assert_close(
        model(x, t, a, encoder_attention_mask=mask).sample, model(x, t, c, encoder_attention_mask=mask).sample
    )


def test_save_load_round_trip(tmp_path):
    model = components.dit()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "DiT" and config["cross_attention_dim"] == 32
    loaded = DiT.from_pretrained(tmp_path).eval()
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 5, 32, generator=g)
    torch.testing.assert_close(loaded(x, 5, c).sample, model(x, 5, c).sample, rtol=0, atol=1e-6)


def test_attention_processors_and_slicing_agree():
    model, g = components.dit(), torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 5, 32, generator=g)
    ref = model(x, 5, c).sample
    assert all(isinstance(p, AttnProcessor2_0) for p in model.attn_processors.values())
    assert len(model.attn_processors) == 4  # self + cross per block
    model.set_attn_processor(AttnProcessor())
    torch.testing.assert_close(model(x, 5, c).sample, ref, atol=1e-5, rtol=1e-4)
    model.set_attention_slice("max")
    assert all(isinstance(p, SlicedAttnProcessor) for p in model.attn_processors.values())
    torch.testing.assert_close(model(x, 5, c).sample, ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="slice_size"):
        model.set_attention_slice(0)


def test_gradient_checkpointing_same_gradients():
    def grads(model):
        model.zero_grad()
        model(torch.ones(1, 4, 16, 16), 5, torch.ones(1, 5, 32)).sample.square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    model = components.dit().train()
    ref = grads(model)
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    for a, b in zip(grads(model), ref, strict=True):
        torch.testing.assert_close(a, b)


def test_peft_lora_adapter():
    from peft import LoraConfig

    model, g = components.dit(), torch.Generator().manual_seed(0)
    x, c = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 5, 32, generator=g)
    ref = model(x, 5, c).sample
    model.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
        )
    )
    assert any("lora_A" in n for n, _ in model.named_parameters())
    assert not torch.allclose(model(x, 5, c).sample, ref)
    model.disable_adapters()
    torch.testing.assert_close(model(x, 5, c).sample, ref)


def test_presets():
    assert {"S", "B", "L", "XL", "shapes"} <= set(DIT_PRESETS)
    model = dit_from_preset("tiny", sample_size=8, cross_attention_dim=16)
    assert model.config.num_layers == 2
    with pytest.raises(ValueError, match="unknown DiT preset 'Q'"):
        dit_from_preset("Q")
