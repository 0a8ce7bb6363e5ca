import json

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from PIL import Image

from gen.pipelines import TextToImagePipeline
from tests import components

SCHEDULERS = [
    DDIMScheduler,
    EulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler,
    DPMSolverMultistepScheduler,
    UniPCMultistepScheduler,
    DDPMScheduler,
    HeunDiscreteScheduler,
]
VARIANTS = {
    "cfg": dict(guidance_scale=6.0),
    "negative": dict(guidance_scale=6.0, negative_prompt="a blue square"),
    "rescale": dict(guidance_scale=6.0, guidance_rescale=0.7),
    "no_cfg": dict(guidance_scale=1.0),
}


def run(pipe, seed=0, **kwargs):
    kwargs = {
        "prompt": "a red circle on a green background",
        "num_inference_steps": 4,
        "output_type": "np",
        **kwargs,
    }
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("scheduler_cls", SCHEDULERS, ids=lambda c: c.__name__)
def test_equals_stable_diffusion_pipeline(unet_pipe, scheduler_cls, variant):
    unet_pipe.scheduler = scheduler_cls.from_config(unet_pipe.scheduler.config)
    sd = StableDiffusionPipeline(
        **{k: getattr(unet_pipe, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd.set_progress_bar_config(disable=True)
    ours, theirs = run(unet_pipe, **VARIANTS[variant]), run(sd, **VARIANTS[variant])
    assert ours.shape == (1, 32, 32, 3)
    assert np.abs(ours - theirs).max() < 1e-4


@pytest.mark.parametrize("denoiser", ["transformer", "unet"])
@pytest.mark.parametrize("scheduler_cls", SCHEDULERS, ids=lambda c: c.__name__)
def test_scheduler_swap(tokenizer, denoiser, scheduler_cls):
    pipe = components.pipeline(tokenizer, denoiser)
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    image = run(pipe, num_inference_steps=3)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    assert 0 <= image.min() and image.max() <= 1


def test_guidance_changes_the_image_and_scale_one_runs_one_branch(dit_pipe):
    calls = []
    original = dit_pipe.transformer.forward
    dit_pipe.transformer.forward = lambda x, *a, **k: calls.append(x.shape[0]) or original(x, *a, **k)
    run(dit_pipe, guidance_scale=1.0)
    assert calls == [1] * 4
    calls.clear()
    run(dit_pipe, guidance_scale=5.0)
    assert calls == [2] * 4  # both CFG branches batched in one forward
    dit_pipe.transformer.forward = original
    assert np.abs(run(dit_pipe, guidance_scale=1.0) - run(dit_pipe, guidance_scale=5.0)).max() > 1e-3


@pytest.mark.parametrize("denoiser", ["transformer", "unet"])
def test_generator_list_equals_single_runs(tokenizer, denoiser):
    pipe = components.pipeline(tokenizer, denoiser)
    prompts = ["a red circle", "a blue star"]
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3, 4)]
    batch = pipe(
        prompts, num_images_per_prompt=2, generator=gens, num_inference_steps=3, output_type="np"
    ).images
    singles = [
        run(pipe, seed=s, prompt=p, num_inference_steps=3)[0]
        for p, s in zip(np.repeat(prompts, 2), (1, 2, 3, 4), strict=True)
    ]
    assert batch.shape == (4, 32, 32, 3)
    assert np.abs(batch - np.stack(singles)).max() < 1e-5


def test_output_types(dit_pipe):
    pil = run(dit_pipe, output_type="pil")
    assert isinstance(pil[0], Image.Image) and pil[0].size == (32, 32)
    pt = run(dit_pipe, output_type="pt")
    assert isinstance(pt, torch.Tensor) and pt.shape == (1, 3, 32, 32)
    latent = run(dit_pipe, output_type="latent")
    assert latent.shape == (1, 4, 16, 16)
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), run(dit_pipe), atol=1e-6)
    out = dit_pipe("x", num_inference_steps=2, return_dict=False)
    assert isinstance(out, tuple) and isinstance(out[0][0], Image.Image)
    assert run(dit_pipe, height=48, width=32).shape == (1, 48, 32, 3)


def test_callback_on_step_end(dit_pipe):
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append((i, int(t), sorted(tensors)))
        return {"latents": tensors["latents"] * 0} if i == 3 else {}

    image = run(
        dit_pipe,
        output_type="latent",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
    )
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert seen[0][2] == ["latents", "prompt_embeds"]
    assert torch.count_nonzero(image) == 0  # the callback's replacement latents were used


def test_prompt_embeds_equal_prompt(dit_pipe):
    embeds, negative = dit_pipe.encode_prompt("a red circle", "cpu", 1, True, "a blue square")
    a = run(dit_pipe, prompt="a red circle", negative_prompt="a blue square")
    b = run(dit_pipe, prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_clip_skip_changes_embeddings(dit_pipe):
    a, _ = dit_pipe.encode_prompt("a red circle", "cpu", 1, False)
    b, _ = dit_pipe.encode_prompt("a red circle", "cpu", 1, False, clip_skip=1)
    assert a.shape == b.shape and not torch.allclose(a, b)


@pytest.mark.parametrize("denoiser", ["transformer", "unet"])
def test_save_load_same_images(tokenizer, tmp_path, denoiser):
    pipe = components.pipeline(tokenizer, denoiser)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    # The module path of every saved custom class is part of the on-disk format.
    assert index["_class_name"] == "TextToImagePipeline"
    if denoiser == "transformer":
        assert index["transformer"] == ["gen.models.dit", "DiT"]
        assert "unet" not in index  # folders written before 0.2 have "unet": [null, null]; both load
    assert (tmp_path / denoiser / "diffusion_pytorch_model.safetensors").exists()
    loaded = TextToImagePipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.denoiser) is type(pipe.denoiser)
    assert np.abs(run(loaded) - run(pipe)).max() < 1e-5


def test_loads_stable_diffusion_folder(unet_pipe, tmp_path):
    sd = StableDiffusionPipeline(
        **{k: getattr(unet_pipe, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    # Real SD folders name a safety checker and feature extractor: they are ignored, not loaded.
    index.update(
        safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
        feature_extractor=["transformers", "CLIPImageProcessor"],
        requires_safety_checker=True,
    )
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    loaded = TextToImagePipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert not hasattr(loaded, "transformer") and loaded.unet is not None
    assert set(loaded.components) == {"vae", "text_encoder", "tokenizer", "scheduler", "unet"}
    assert np.abs(run(loaded) - run(unet_pipe)).max() < 1e-5


def test_at_most_one_denoiser_and_generation_needs_one(tokenizer):
    parts = dict(
        vae=components.vae(),
        text_encoder=components.text_encoder(tokenizer),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(),
    )
    with pytest.raises(ValueError, match="this pipeline has no denoiser: give transformer="):
        TextToImagePipeline(**parts)("a cat", num_inference_steps=1)
    with pytest.raises(ValueError, match="exactly one denoiser.*got both"):
        TextToImagePipeline(**parts, transformer=components.dit(), unet=components.unet())


def test_vae_slicing_and_tiling_keep_the_image(dit_pipe):
    ref = run(dit_pipe, prompt=["a", "b"])
    dit_pipe.enable_vae_slicing()
    np.testing.assert_allclose(run(dit_pipe, prompt=["a", "b"]), ref, atol=1e-5)
    dit_pipe.enable_attention_slicing("max")
    np.testing.assert_allclose(run(dit_pipe, prompt=["a", "b"]), ref, atol=1e-5)


def test_fp16_vae_decodes_in_fp32_unless_fixed_and_nan_is_an_error(dit_pipe):
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ref = dit_pipe.decode_latents(latents)
    dit_pipe.vae.to(torch.float16)
    out = dit_pipe.decode_latents(latents)
    assert dit_pipe.vae.dtype == torch.float16  # restored after the fp32 decode
    assert out.dtype == torch.float32  # fp16 weights rounded once, the decode itself ran in fp32
    torch.testing.assert_close(out, ref, atol=3e-3, rtol=0)
    dit_pipe.vae.register_to_config(force_upcast=False)  # a fixed fp16 VAE's config (SDXL's fp16-fix) says so
    fixed = dit_pipe.decode_latents(latents)
    assert fixed.dtype == torch.float16  # decoded as given
    torch.testing.assert_close(fixed.float(), ref, atol=5e-3, rtol=0)
    with pytest.raises(FloatingPointError, match="contain NaN or infinite values"):
        dit_pipe.decode_latents(torch.full((1, 4, 16, 16), float("nan")))


def test_custom_timesteps_and_sigmas(unet_pipe):
    unet_pipe.scheduler = EulerDiscreteScheduler.from_config(unet_pipe.scheduler.config)
    seen = []
    cb = lambda pipe, i, t, kw: seen.append(int(t)) or {}  # noqa: E731
    run(unet_pipe, timesteps=[999, 700, 300, 50], callback_on_step_end=cb)
    assert seen == [999, 700, 300, 50]
    image = run(unet_pipe, sigmas=[14.6, 5.0, 1.0, 0.3])
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    unet_pipe.scheduler = DDPMScheduler.from_config(unet_pipe.scheduler.config)
    with pytest.raises(ValueError, match="sigmas"):
        run(unet_pipe, sigmas=[1.0, 0.5])
