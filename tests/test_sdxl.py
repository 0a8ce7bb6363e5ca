"""SDXL: the same images as diffusers' StableDiffusionXLPipeline on tiny SDXL parts built in code (five samplers x
prompt variants), A1111's prompt semantics on both encoders, and loading SDXL folders."""

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

import gen
from gen.pipelines import ImageToImagePipeline, InpaintPipeline, TextToImagePipeline
from tests import components
from tests.test_image_to_image import SAMPLERS  # the five of the core equivalence tests

VARIANTS = {
    "plain": {},
    "negative": {"negative_prompt": "a blue square"},
    "prompt_2": {"prompt_2": "a green star"},
    "sizes": {"original_size": (64, 48), "crops_coords_top_left": (4, 8), "target_size": (32, 40)},
    "negative sizes": {"negative_original_size": (16, 16), "negative_target_size": (64, 64)},
    "denoising_end": {"denoising_end": 0.6},
    "clip_skip": {"clip_skip": 1},  # no negative prompt: zeros, so diffusers' and A1111's readings agree
}


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    return components.sdxl_pipeline(tmp_path_factory.mktemp("sdxl"))


def run(pipe, prompt="a red circle", seed=0, **kwargs):
    kwargs = {"num_inference_steps": 4, "guidance_scale": 6.0, "height": 32, "width": 32, **kwargs}
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, output_type="np", generator=generator, **kwargs).images


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.__name__.replace("Scheduler", ""))
def test_same_images_as_stable_diffusion_xl(xl, sampler):
    sd = components.stable_diffusion_xl(xl)
    config = xl.scheduler.config
    images = {}
    for name, variant in VARIANTS.items():
        xl.scheduler, sd.scheduler = sampler.from_config(config), sampler.from_config(config)
        ours, theirs = run(xl, **variant), run(sd, **variant)
        assert np.abs(ours - theirs).max() < 1e-4, (name, np.abs(ours - theirs).max())
        images[name] = ours
    for name in VARIANTS:
        if name != "plain":
            assert np.abs(images[name] - images["plain"]).max() > 1e-3, name  # each variant changes the image
    xl.scheduler = EulerDiscreteScheduler.from_config(config)


def test_encode_prompt_gives_four_tensors_that_call_back_the_same_image(xl):
    embeds = xl.encode_prompt("a red circle", "cpu", negative_prompt="a blue square", prompt_2="a green star")
    assert [tuple(e.shape) for e in embeds] == [(1, 77, 80), (1, 77, 80), (1, 32), (1, 32)]
    names = (
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
    )
    again = run(xl, prompt=None, **dict(zip(names, embeds, strict=True)))
    assert np.abs(again - run(xl, negative_prompt="a blue square", prompt_2="a green star")).max() < 1e-6
    with pytest.raises(ValueError, match="SDXL needs pooled_prompt_embeds with prompt_embeds"):
        run(xl, prompt=None, prompt_embeds=embeds[0])


def test_an_absent_negative_is_zeros_unless_the_config_says_otherwise(xl):
    assert xl.config.force_zeros_for_empty_prompt is True
    zero = xl.encode_prompt("a red circle", "cpu")
    assert zero[1].abs().max() == 0 and zero[3].abs().max() == 0
    empty = xl.encode_prompt("a red circle", "cpu", negative_prompt="")
    assert empty[1].abs().max() > 0  # "" is a prompt, as in diffusers


def test_weights_and_long_prompts_on_both_encoders(xl):
    plain = xl.encode_prompt("a red circle", "cpu", do_classifier_free_guidance=False)
    weighted = xl.encode_prompt("a (red:1.5) circle", "cpu", do_classifier_free_guidance=False)
    diff = (plain[0] - weighted[0]).abs()
    assert diff[..., :32].max() > 1e-3 and diff[..., 32:].max() > 1e-3  # both encoders' halves weighted
    assert torch.equal(plain[2], weighted[2])  # A1111 leaves the pooled embedding unweighted
    long = " ".join(["a red circle on a blue background"] * 20)
    chunks = xl.encode_prompt(long, "cpu", do_classifier_free_guidance=False)
    assert chunks[0].shape[1] % 77 == 0 and chunks[0].shape[1] > 77
    truncated = xl.encode_prompt(long, "cpu", do_classifier_free_guidance=False, truncate_long_prompts=True)
    assert torch.allclose(
        chunks[2], truncated[2], atol=1e-6
    )  # pooled: the first chunk's, as diffusers truncates
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    kw = {"num_inference_steps": 3, "height": 32, "width": 32, "output_type": "np"}
    both = xl(["a red circle", long], generator=gens, **kw).images
    alone = xl(["a red circle"], generator=[torch.Generator().manual_seed(3)], **kw).images
    assert np.abs(both[0] - alone[0]).max() < 1e-5  # a longer batch-mate does not change an image


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_img2img_and_inpaint_equal_diffusers_sdxl(xl, task):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    cls, theirs, extra = (ImageToImagePipeline, StableDiffusionXLImg2ImgPipeline, {})
    if task == "inpaint":
        cls, theirs, extra = (
            InpaintPipeline,
            StableDiffusionXLInpaintPipeline,
            {"mask_image": Image.fromarray(mask)},
        )
    ours = cls.from_pipe(xl)
    names = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
    sd = theirs(**{k: getattr(xl, k) for k in names}, requires_aesthetics_score=False, add_watermarker=False)
    sd.set_progress_bar_config(disable=True)
    for strength in (0.3, 0.75, 1.0):
        a, b = (run(p, image=image, strength=strength, num_inference_steps=10, **extra) for p in (ours, sd))
        assert np.abs(a - b).max() < 1e-4, (strength, np.abs(a - b).max())


def test_model_cpu_offload_gives_the_same_image(tmp_path):
    pipe = components.sdxl_pipeline(tmp_path)
    before = run(pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    assert np.abs(run(pipe) - before).max() == 0


def test_sdxl_folders_load_as_sdxl(xl, tmp_path):
    sd = components.stable_diffusion_xl(xl)
    sd.save_pretrained(tmp_path / "diffusers")  # a StableDiffusionXLPipeline folder, as users have them
    xl.save_pretrained(tmp_path / "gen")
    reference = run(xl)
    for folder in ("diffusers", "gen"):
        pipe = gen.load_pipeline(tmp_path / folder)
        assert type(pipe) is TextToImagePipeline and pipe.is_sdxl and pipe.default_size == 32
        assert pipe.config.force_zeros_for_empty_prompt is True
        assert np.abs(run(pipe) - reference).max() < 1e-5, folder


def kohya_xl_file(path, pipe):
    """A kohya-ss SDXL LoRA for the tiny parts, keys written from the module names as kohya writes them:
    lora_unet_…, lora_te1_… (the first encoder), lora_te2_… (the second); rank 4, alpha 2."""
    from safetensors.torch import save_file

    block = "down_blocks.1.attentions.0.transformer_blocks.0"
    unet = [
        f"{block}.attn1.to_q",
        f"{block}.attn2.to_k",
        f"{block}.ff.net.2",
        "down_blocks.1.attentions.0.proj_in",
    ]
    layers = {f"lora_unet_{n.replace('.', '_')}": pipe.unet.get_submodule(n) for n in unet}
    for prefix, encoder in (("lora_te1", pipe.text_encoder), ("lora_te2", pipe.text_encoder_2)):
        for n in ("self_attn.q_proj", "mlp.fc1"):
            module = encoder.get_submodule(
                f"text_model.encoder.layers.0.{n}"
                if hasattr(encoder, "text_model")
                else f"encoder.layers.0.{n}"
            )
            layers[f"{prefix}_text_model_encoder_layers_0_{n.replace('.', '_')}"] = module
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, layer in layers.items():
        state[f"{key}.lora_down.weight"] = torch.randn((4, layer.in_features), generator=generator) * 0.3
        state[f"{key}.lora_up.weight"] = torch.randn((layer.out_features, 4), generator=generator) * 0.3
        state[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(state, str(path))
    return path


def test_sdxl_loras_kohya_and_diffusers_give_diffusers_images(tmp_path):
    from peft.utils import get_peft_model_state_dict

    ours = components.sdxl_pipeline(tmp_path / "a")
    sd = components.stable_diffusion_xl(components.sdxl_pipeline(tmp_path / "b"))  # separate, equal weights
    base = run(ours)
    file = kohya_xl_file(tmp_path / "style.safetensors", ours)
    ours.load_lora_weights(file, adapter_name="k")
    sd.load_lora_weights(str(file), adapter_name="k")

    def adapted(pipe):
        encoders = (pipe.text_encoder, pipe.text_encoder_2)
        return [sorted(n for n, m in e.named_modules() if hasattr(m, "scaling")) for e in encoders]

    assert adapted(ours) == adapted(sd) and all(adapted(ours))  # both encoders got theirs, as in diffusers
    want = run(sd)
    assert np.abs(run(ours) - want).max() < 1e-5 and np.abs(want - base).max() > 1e-2
    # The UNet part in diffusers' format, written by diffusers' SDXL saver, gives diffusers' images too. (Its
    # text-encoder part is left out: diffusers 0.42 cannot read back text-encoder LoRAs it saved this way.)
    sd.save_lora_weights(
        tmp_path / "diffusers", unet_lora_layers=get_peft_model_state_dict(sd.unet, adapter_name="k")
    )
    ours.unload_lora_weights()
    assert np.abs(run(ours) - base).max() < 1e-5
    ours.load_lora_weights(tmp_path / "diffusers", adapter_name="d")
    fresh = components.stable_diffusion_xl(components.sdxl_pipeline(tmp_path / "c"))
    fresh.load_lora_weights(str(tmp_path / "diffusers"), adapter_name="d")
    want = run(fresh)
    assert np.abs(run(ours) - want).max() < 1e-5 and np.abs(want - base).max() > 1e-2
    with pytest.raises(ValueError, match=r"is a LoRA for unet; this pipeline's denoiser is `transformer`"):
        components.pipeline(components.write_tokenizer(tmp_path / "t")).load_lora_weights(
            tmp_path / "diffusers"
        )


def test_cli_info_generate_and_reproduce_on_an_sdxl_folder(xl, tmp_path, capsys):
    from gen.cli import main

    folder = tmp_path / "sdxl"
    xl.save_pretrained(folder)
    assert main(["info", str(folder)]) == 0
    info = capsys.readouterr().out
    assert "default size 32x32" in info and "text_encoder_2  CLIPTextModelWithProjection" in info
    assert "tokenizer_2" in info
    out = tmp_path / "x.png"
    assert main(["a red circle", "--model", str(folder), "-o", str(out), "--steps", "3", "--seed", "2"]) == 0
    capsys.readouterr()
    assert main(["reproduce", str(out), "--verify"]) == 0
    assert "max pixel difference: 0" in capsys.readouterr().out
    from PIL import Image

    made = np.asarray(Image.open(out).convert("RGB")).astype(int)
    xl.scheduler = EulerDiscreteScheduler.from_config(xl.scheduler.config)
    want = xl("a red circle", num_inference_steps=3, generator=[torch.Generator().manual_seed(2)]).images[0]
    assert np.abs(made - np.asarray(want).astype(int)).max() <= 1  # the CLI's image is the pipeline's


def test_sdxl_single_file_round_trip_through_the_cli(xl, tmp_path, capsys):
    from gen.cli import main
    from gen.loading.pipeline import load_single_file
    from gen.pipelines.single_file import detect_version

    xl.save_pretrained(tmp_path / "folder")
    out = tmp_path / "model.safetensors"
    assert main(["convert", str(tmp_path / "folder"), "--to-single-file", str(out)]) == 0
    assert detect_version(out) == "xl"
    loaded = load_single_file(out, config=tmp_path / "folder")  # the tiny parts' configs, not SDXL's
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(xl, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
    loaded.set_progress_bar_config(disable=True)
    assert np.abs(run(loaded) - run(xl)).max() == 0
    with pytest.raises(ValueError, match="does not fit the Stable Diffusion xl configs"):
        load_single_file(out)  # the shipped SDXL configs, offline; they do not fit the tiny parts


def test_shipped_sdxl_configs_cover_the_real_architecture(tmp_path):
    """The real SDXL UNet, VAE and OpenCLIP bigG encoder, built on the meta device: every weight has an
    original-layout name that diffusers' single-file converters map back to it."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from gen.pipelines.single_file import _unet_key, _vae_key, config_folder, open_clip_state

    folder = config_folder("xl", tmp_path / "xl")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        encoder = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # SDXL base's UNet
    original = {"model.diffusion_model." + _unet_key(k, unet.config): v for k, v in unet.state_dict().items()}
    assert set(convert_ldm_unet_checkpoint(original, unet.config)) == set(unet.state_dict())
    original = {"first_stage_model." + _vae_key(k, 4): v for k, v in vae.state_dict().items()}
    assert set(convert_ldm_vae_checkpoint(original, vae.config)) == set(vae.state_dict())
    prefix = "conditioner.embedders.1.model."
    original = {prefix + k: v for k, v in open_clip_state(encoder).items()}
    converted = convert_open_clip_checkpoint(encoder, original, prefix=prefix)
    assert set(converted) == {k for k in encoder.state_dict() if not k.endswith("position_ids")}
    assert encoder.config.hidden_size == 1280 and encoder.config.num_hidden_layers == 32
    assert CLIPTokenizer.from_pretrained(folder / "tokenizer_2").pad_token == "!"
    assert json_default_size(folder) == 1024


def json_default_size(folder):
    from gen.loading.info import _default_size

    return _default_size(folder)


def test_vae_tiling_as_diffusers(tmp_path):
    ours = components.sdxl_pipeline(tmp_path / "a")
    sd = components.stable_diffusion_xl(components.sdxl_pipeline(tmp_path / "b"))
    plain = run(ours, height=64, width=64)
    ours.enable_vae_tiling()
    sd.vae.enable_tiling()  # diffusers 0.42's SDXL pipeline dropped the wrapper
    for pipe in (ours, sd):
        pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = 32, 16  # tiles at this tiny size
    tiled = run(ours, height=64, width=64)
    assert np.abs(tiled - run(sd, height=64, width=64)).max() < 1e-4
    assert np.abs(tiled - plain).max() > 1e-4  # tiling did happen
