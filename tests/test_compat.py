"""What users bring that gen's own fixtures did not: text encoders whose context is not 77 tokens, prompts whose
batch-mates are longer, old SD scheduler configs, and pipelines built from some components only."""

import warnings

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline

from gen.pipelines import TextToImagePipeline
from gen.text.encode import encode
from gen.text.prompts import explain, tokenize_weighted
from tests import components

LONG = " ".join(["a red circle on a blue background with a green star and a white cross"] * 12)


@pytest.fixture(scope="module")
def tokenizer32(tmp_path_factory):
    """diffusers' style of tiny test parts: a 32-token context (Long-CLIP has 248, SD 77)."""
    return components.write_tokenizer(tmp_path_factory.mktemp("tok32"), length=32)


def stable_diffusion(pipe: TextToImagePipeline) -> StableDiffusionPipeline:
    sd = StableDiffusionPipeline(
        **{k: getattr(pipe, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd.set_progress_bar_config(disable=True)
    return sd


def encode_text(pipe, prompts, negatives):
    return pipe._encode_text(prompts, "cpu", True, negatives, prompt_embeds=None, negative_prompt_embeds=None)


def run(pipe, prompt="a red circle on a green background", seed=0, **kwargs):
    generator = [torch.Generator().manual_seed(seed + k) for k in range(len(prompt))]
    if isinstance(prompt, str):
        generator = torch.Generator().manual_seed(seed)
    kwargs = {"num_inference_steps": 3, "output_type": "np", "guidance_scale": 6.0, **kwargs}
    return pipe(prompt, generator=generator, **kwargs).images


@pytest.mark.parametrize("negative", [None, "a blue square"])
def test_32_token_encoder_equals_stable_diffusion(tokenizer32, negative):
    pipe = components.pipeline(tokenizer32, "unet")
    assert pipe.text_encoder.config.max_position_embeddings == 32
    ours, theirs = run(pipe, negative_prompt=negative), run(stable_diffusion(pipe), negative_prompt=negative)
    assert np.abs(ours - theirs).max() < 1e-4


@pytest.mark.parametrize("denoiser", ["transformer", "unet"])
def test_32_token_encoder_chunks_long_prompts_in_30_token_windows(tokenizer32, denoiser):
    pipe = components.pipeline(tokenizer32, denoiser)
    chunks = tokenize_weighted(tokenizer32, LONG)
    assert all(len(row) == 32 for row in chunks.ids) and chunks.lengths[0] == 32
    assert len(chunks.ids) == -(-len(tokenizer32(LONG, add_special_tokens=False).input_ids) // 30)
    embeds = encode(tokenizer32, pipe.text_encoder, [LONG, "a cat"], "cpu")
    assert embeds.shape == (2, 32 * len(chunks.ids), 32)
    assert run(pipe, LONG).shape == (1, 32, 32, 3)
    assert "chunk 1: 30/30 tokens" in explain(tokenizer32, LONG)


def test_window_is_capped_by_the_encoders_positions_and_unset_length_is_refused(
    tokenizer32, tokenizer, tmp_path
):
    from gen.text.encode import chunk_length

    assert chunk_length(tokenizer, components.text_encoder(tokenizer, positions=32)) == 32
    assert chunk_length(tokenizer32, components.text_encoder(tokenizer32, positions=77)) == 32
    unset = components.write_tokenizer(tmp_path, length=int(1e30))  # transformers' "no length" sentinel
    with pytest.raises(ValueError, match=r"model_max_length is 1000000000000000019884624838656; set it"):
        tokenize_weighted(unset, "a cat")


@pytest.mark.parametrize("denoiser", ["transformer", "unet"])
def test_a_prompts_image_does_not_depend_on_longer_batch_mates(tokenizer, denoiser):
    pipe = components.pipeline(tokenizer, denoiser)
    short = ["a red circle", "a blue square on a white background"]
    alone = run(pipe, short, negative_prompt=["", "a cat"])
    batched = run(pipe, [*short, LONG], negative_prompt=["", "a cat", ""])
    assert np.abs(batched[:2] - alone).max() < 1e-5
    # The long prompt's own image is what it is alone, too.
    assert np.abs(batched[2] - run(pipe, [LONG], seed=2)[0]).max() < 1e-5


def test_long_negative_pads_its_own_prompt_only(tokenizer):
    pipe = components.pipeline(tokenizer, "transformer")
    text = encode_text(pipe, ["a cat", "a dog"], [LONG, ""])
    k = text.prompt_embeds.shape[1] // 77
    assert k > 1 and text.chunks == [k, 1]
    # The pair (a cat, LONG) pads "a cat" with attended empty chunks, as A1111 pads to the longer of the two.
    alone = encode_text(pipe, ["a cat"], [LONG])
    assert alone.chunks is None and torch.allclose(alone.prompt_embeds[0], text.prompt_embeds[0], atol=1e-6)


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DDPMScheduler])
def test_outdated_scheduler_config_is_fixed_like_stable_diffusion(tokenizer, scheduler_cls):
    old = dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=0, clip_sample=True
    )
    with pytest.warns(FutureWarning, match="steps_offset"):
        pipe = components.pipeline(tokenizer, "unet", scheduler=scheduler_cls(**old))
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.clip_sample is False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        sd = stable_diffusion(components.pipeline(tokenizer, "unet", scheduler=scheduler_cls(**old)))
    assert np.abs(run(pipe, num_inference_steps=4) - run(sd, num_inference_steps=4)).max() < 1e-4


def test_text_only_pipeline_encodes_and_refuses_to_generate(tokenizer):
    full = components.pipeline(tokenizer, "transformer")
    text = TextToImagePipeline(vae=None, text_encoder=full.text_encoder, tokenizer=tokenizer, scheduler=None)
    pos, neg = text.encode_prompt("a red circle", "cpu", 2, True, "a cat")
    ref_pos, ref_neg = full.encode_prompt("a red circle", "cpu", 2, True, "a cat")
    assert torch.equal(pos, ref_pos) and torch.equal(neg, ref_neg) and pos.shape == (2, 77, 32)
    with pytest.raises(ValueError, match="this pipeline has no denoiser: give transformer="):
        text("a red circle", num_inference_steps=1)
