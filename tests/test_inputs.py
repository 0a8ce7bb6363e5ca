import logging

import pytest
import torch

CASES = [
    (
        dict(height=30),
        r"height=30 must be a positive multiple of 4 \(VAE factor 2 x patch size 2\); nearest valid: 32",
    ),
    (dict(width=41), r"width=41 must be a positive multiple of 4 .*nearest valid: 40"),
    (dict(width=0), r"width=0 must be a positive multiple of 4"),
    (dict(num_inference_steps=0), r"num_inference_steps=0 must be an integer >= 1"),
    (dict(negative_prompt=["a", "b"]), r"negative_prompt has 2 entries but prompt has 1"),
    (dict(prompt_embeds=torch.zeros(1, 77, 32)), r"give prompt or prompt_embeds, not both"),
    (dict(output_type="jpeg"), r"output_type='jpeg' is not one of \['pil', 'np', 'pt', 'latent'\]"),
    (dict(guidance_scale=-1.0), r"guidance_scale=-1.0 must be a finite number >= 0"),
    (dict(guidance_scale=float("nan")), r"guidance_scale=nan must be a finite number >= 0"),
    (dict(guidance_rescale=2.0), r"guidance_rescale=2.0 must be between 0 and 1"),
    (dict(generator=[torch.Generator()] * 3), r"got 3 generators for 1 images"),
    (dict(num_images_per_prompt=0), r"num_images_per_prompt=0 must be an integer >= 1"),
    (dict(callback_on_step_end_tensor_inputs=["noise"]), r"\['noise'\] not in"),
]


@pytest.mark.parametrize("kwargs,message", CASES, ids=[m[:30] for _, m in CASES])
def test_bad_input_raises_before_work(dit_pipe, kwargs, message):
    calls = []
    dit_pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=message):
        dit_pipe(**{"prompt": "a red circle", "num_inference_steps": 2, **kwargs})
    if "generator" not in kwargs:
        assert calls == []  # refused before the text encoder ran


def test_unet_stride_is_the_vae_factor(unet_pipe):
    with pytest.raises(ValueError, match=r"height=37 must be a positive multiple of 2 .*nearest valid: 36"):
        unet_pipe("x", height=37, num_inference_steps=1)
    assert unet_pipe.latent_stride == 2


def test_too_long_prompt_truncated_on_request_warns_with_cut_text(dit_pipe, caplog):
    prompt = "a red circle " * 30 + "on a purple background"
    with caplog.at_level(logging.WARNING, logger="gen.text.encode"):
        embeds, _ = dit_pipe.encode_prompt(prompt, "cpu", 1, False, truncate_long_prompts=True)
    assert embeds.shape[1] == 77
    assert "this part was cut" in caplog.text and "purple background" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gen.text.encode"):
        embeds, _ = dit_pipe.encode_prompt(prompt, "cpu", 1, False)  # the default: chunks, nothing cut
    assert embeds.shape[1] == 2 * 77 and "cut" not in caplog.text
