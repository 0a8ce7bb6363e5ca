"""SD3 and Flux: gen's pipelines give diffusers' StableDiffusion3Pipeline / FluxPipeline images on the same tiny
components, for their schedulers and call variants; folders load by model_index.json; bad input is one line."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    FluxPipeline,
    StableDiffusion3Pipeline,
)

from gen.loading.pipeline import load_pipeline
from gen.pipelines import FluxTextToImagePipeline, SD3TextToImagePipeline
from tests.flow_parts import flux_parts, sd3_parts

TOLERANCE = 1e-4  # max |gen - diffusers| on float images in [0, 1]
PROMPT = "a red circle on a blue background"
BASE = {"prompt": PROMPT, "num_inference_steps": 4, "height": 32, "width": 32, "max_sequence_length": 16}

SCHEDULERS = {
    "euler": lambda: FlowMatchEulerDiscreteScheduler(),
    "euler-shift-3": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
    "euler-dynamic": lambda: FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15
    ),
    "heun": lambda: FlowMatchHeunDiscreteScheduler(shift=3.0),
}
SD3_CALLS = {
    "plain": {},
    "negative": {"negative_prompt": "a green square", "guidance_scale": 5.0},
    "prompt_2/3": {
        "prompt_2": "a blue square",
        "prompt_3": "a large cat",
        "negative_prompt": "small",
        "negative_prompt_2": "green",
        "negative_prompt_3": "a dog",
    },
    "batch x2 images": {"prompt": [PROMPT, "a small green star"], "num_images_per_prompt": 2},
    "no CFG": {"guidance_scale": 1.0},
    "clip_skip": {"guidance_scale": 1.0, "clip_skip": 1},  # diffusers reads negatives' default layer
    "T5 truncated": {"max_sequence_length": 4},
    "skip-layer guidance": {"num_inference_steps": 10, "skip_guidance_layers": [0]},
    "sigmas": {"sigmas": [1.0, 0.7, 0.4, 0.2]},
}
FLUX_CALLS = {
    "plain": {},
    "distilled guidance 5": {"guidance_scale": 5.0},
    "true CFG": {"negative_prompt": "a green square", "true_cfg_scale": 2.0},
    "prompt_2": {"prompt_2": "a large cat", "negative_prompt": "dog", "true_cfg_scale": 1.5},
    "batch x2 images": {"prompt": [PROMPT, "a small green star"], "num_images_per_prompt": 2},
    "T5 truncated": {"max_sequence_length": 4},
    "sigmas": {"sigmas": [1.0, 0.7, 0.4, 0.2]},
}


def pair(family: str, folder, scheduler: str = "euler", **options):
    """gen's pipeline and diffusers' on the same components (each its own scheduler: it holds the call's state)."""
    build, gen_cls, ref_cls = {
        "sd3": (sd3_parts, SD3TextToImagePipeline, StableDiffusion3Pipeline),
        "flux": (flux_parts, FluxTextToImagePipeline, FluxPipeline),
    }[family]
    parts = build(folder, scheduler=SCHEDULERS[scheduler](), **options)
    pipes = gen_cls(**parts), ref_cls(**{**parts, "scheduler": copy.deepcopy(parts["scheduler"])})
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    return pipes


def difference(pipes, **call) -> float:
    """max |gen - diffusers| over the images of one seeded call."""
    images = [
        pipe(**{**BASE, **call}, generator=torch.Generator().manual_seed(0), output_type="np").images
        for pipe in pipes
    ]
    assert images[0].shape == images[1].shape
    return float(np.abs(images[0] - images[1]).max())


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("call", SD3_CALLS)
def test_sd3_equals_diffusers(tmp_path, scheduler, call):
    if scheduler == "heun" and "sigmas" in SD3_CALLS[call]:
        pytest.skip("FlowMatchHeun takes no custom sigmas (diffusers refuses them too)")
    assert difference(pair("sd3", tmp_path, scheduler), **SD3_CALLS[call]) < TOLERANCE


def test_sd3_without_t5_equals_diffusers(tmp_path):
    pipes = pair("sd3", tmp_path, t5=False)
    assert pipes[0].text_encoder_3 is None
    assert difference(pipes, negative_prompt="green") < TOLERANCE


@pytest.mark.parametrize("scheduler", ["euler", "euler-dynamic"])
@pytest.mark.parametrize("call", FLUX_CALLS)
def test_flux_equals_diffusers(tmp_path, scheduler, call):
    assert difference(pair("flux", tmp_path, scheduler), **FLUX_CALLS[call]) < TOLERANCE


def test_flux_schnell_equals_diffusers(tmp_path):
    """schnell: no guidance embedding, so guidance_scale changes nothing, in gen as in diffusers."""
    pipes = pair("flux", tmp_path, "euler-dynamic", guidance_embeds=False)
    assert difference(pipes, num_inference_steps=2) < TOLERANCE
    first = pipes[0](**BASE, generator=torch.Generator().manual_seed(0), output_type="np").images
    other = pipes[0](**BASE, guidance_scale=9.0, generator=torch.Generator().manual_seed(0), output_type="np")
    assert np.array_equal(first, other.images)


def test_flux_heun_runs_where_diffusers_refuses(tmp_path):
    """FluxPipeline passes its linear sigmas to any scheduler, and FlowMatchHeun takes none; gen lets such a
    scheduler space its own steps. Seeded calls repeat exactly."""
    ours, theirs = pair("flux", tmp_path, "heun")
    with pytest.raises(ValueError, match="sigmas"):
        theirs(**BASE, generator=torch.Generator().manual_seed(0))
    images = [ours(**BASE, generator=torch.Generator().manual_seed(0), output_type="np").images for _ in "ab"]
    assert images[0].shape == (1, 32, 32, 3) and np.array_equal(*images)


def test_callback_replaces_latents_as_in_diffusers(tmp_path):
    def halve(pipe, i, t, kwargs):
        return {"latents": kwargs["latents"] * 0.5} if i == 1 else {}

    call = {"callback_on_step_end": halve, "callback_on_step_end_tensor_inputs": ["latents", "prompt_embeds"]}
    assert difference(pair("sd3", tmp_path), **call) < TOLERANCE
    assert difference(pair("flux", tmp_path), **call) < TOLERANCE


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_folders_load_by_model_index(tmp_path, family):
    """A folder diffusers saved loads as gen's pipeline for its family, and gives diffusers' images."""
    ours, theirs = pair(family, tmp_path / "parts")
    theirs.save_pretrained(tmp_path / "model")
    loaded = load_pipeline(tmp_path / "model")
    assert type(loaded) is type(ours)
    assert difference((loaded, theirs)) < TOLERANCE
    loaded.save_pretrained(tmp_path / "again")  # gen's class is recorded, and loads back as itself
    index = json.loads((tmp_path / "again" / "model_index.json").read_text())
    assert index["_class_name"] == type(ours).__name__
    assert type(load_pipeline(tmp_path / "again")) is type(ours)


def test_t5_weights_follow_forge(tmp_path):
    """(word:1.5) on T5: the word's embeddings scaled, the sequence mean restored (A1111's "Original" emphasis, as
    Forge applies it to T5); without the syntax, diffusers' exact tokens."""
    from gen.text.t5 import embed_t5

    parts = flux_parts(tmp_path)
    tokenizer, encoder = parts["tokenizer_2"], parts["text_encoder_2"]
    plain = embed_t5(tokenizer, encoder, ["a red circle"], "cpu", 8)
    ids = tokenizer("a red circle", padding="max_length", max_length=8, truncation=True, return_tensors="pt")
    assert torch.equal(plain, encoder(ids.input_ids)[0])
    weighted = embed_t5(tokenizer, encoder, ["a (red:1.5) circle"], "cpu", 8)
    z = encoder(ids.input_ids)[0]
    w = torch.ones(1, 8)
    w[0, 1] = 1.5  # "▁red" is the second token
    expected = z * w[..., None]
    expected = expected * (z.mean() / expected.mean())
    assert torch.allclose(weighted, expected, atol=1e-6)
    off = embed_t5(tokenizer, encoder, ["a (red:1.5) circle"], "cpu", 8, weighting=False)
    assert not torch.allclose(off, plain)  # the brackets read as text, as diffusers reads them


@pytest.mark.parametrize(
    ("family", "call", "message"),
    [
        ("flux", {"height": 33}, "height=33 must be a positive multiple of 2"),
        ("sd3", {"max_sequence_length": 600}, "max_sequence_length=600 must be an integer from 1 to 512"),
        ("sd3", {"clip_skip": 5}, "clip_skip=5 must be between -1 and 1"),
        ("flux", {"true_cfg_scale": float("nan")}, "guidance_scale=nan must be a finite number"),
        ("sd3", {"prompt": None}, "give a prompt"),
        ("flux", {"generator": [torch.Generator()] * 3}, "got 3 generators for 1 images"),
    ],
)
def test_bad_input_is_one_line(tmp_path, family, call, message):
    ours, _ = pair(family, tmp_path)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        ours(**{**BASE, **call})
    assert "\n" not in str(error.value)


def test_vae_tiling_and_slicing_reach_the_vae(tmp_path):
    ours, _ = pair("flux", tmp_path)
    ours.enable_vae_tiling()
    ours.enable_vae_slicing()
    assert ours.vae.use_tiling and ours.vae.use_slicing
    ours.disable_vae_tiling()
    ours.disable_vae_slicing()
    assert not ours.vae.use_tiling and not ours.vae.use_slicing


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_model_cpu_offload_gives_the_same_image(tmp_path, family):
    """diffusers' offload hooks on every model of model_cpu_offload_seq, run on the CPU as the execution device (no
    accelerator here: the hooks' moves are then no-ops, their order and the pipeline's device are what is checked)."""
    ours, _ = pair(family, tmp_path)
    before = difference((ours, ours))  # 0: the same seeded call twice
    image = ours(**BASE, generator=torch.Generator().manual_seed(0), output_type="np").images
    ours.enable_model_cpu_offload(device="cpu")
    models = [n for n in ours.model_cpu_offload_seq.split("->") if getattr(ours, n, None) is not None]
    assert all(hasattr(getattr(ours, n), "_hf_hook") for n in models), models
    offloaded = ours(**BASE, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert before == 0 and np.abs(offloaded - image).max() == 0


def test_t5_keeps_its_feed_forward_output_in_fp32_when_loaded_in_fp16(tmp_path):
    """T5's fp16 overflow: transformers keeps T5's `wo` projections in fp32 (its _keep_in_fp32_modules) when the
    pipeline loads in fp16, and clamps fp16 hidden states; through gen's loader the prompt embeddings stay finite and
    near fp32's."""
    _, theirs = pair("flux", tmp_path / "parts")
    theirs.save_pretrained(tmp_path / "model")
    half = FluxTextToImagePipeline.from_pretrained(tmp_path / "model", dtype=torch.float16)
    full = FluxTextToImagePipeline.from_pretrained(tmp_path / "model")
    wo = {n: p.dtype for n, p in half.text_encoder_2.named_parameters() if n.endswith("wo.weight")}
    assert wo and set(wo.values()) == {torch.float32}
    assert half.text_encoder_2.shared.weight.dtype == torch.float16
    a = half.encode_prompt([PROMPT], device="cpu", max_sequence_length=16)[0]
    b = full.encode_prompt([PROMPT], device="cpu", max_sequence_length=16)[0]
    assert torch.isfinite(a).all() and torch.allclose(a.float(), b, atol=2e-2)
