import pytest
import torch
from peft import LoraConfig

from gen.pipelines import TextToImagePipeline
from tests import components

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def run(pipe):
    return pipe(
        "a red circle",
        num_inference_steps=3,
        guidance_scale=5.0,  # gen's default; StableDiffusionPipeline's is 7.5
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


def adapted(tokenizer, denoiser, seed):
    pipe = components.pipeline(tokenizer, denoiser)
    torch.manual_seed(seed)
    pipe.denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False))
    return pipe


@pytest.mark.parametrize("denoiser", ["transformer", "unet"])
def test_save_load_set_adapters_fuse(tokenizer, tmp_path, denoiser):
    a, b = adapted(tokenizer, denoiser, 1), adapted(tokenizer, denoiser, 2)
    a.save_lora_weights(tmp_path / "a.safetensors")
    b.save_lora_weights(tmp_path / "b.safetensors")
    with_a = run(a)
    pipe = components.pipeline(tokenizer, denoiser)
    base = run(pipe)
    assert pipe.load_lora_weights(tmp_path / "a.safetensors", adapter_name="a") == "a"
    assert abs(run(pipe) - with_a).max() < 1e-5  # the loaded adapter reproduces the one it was saved from
    pipe.load_lora_weights(tmp_path / "b.safetensors", adapter_name="b")
    pipe.set_adapters(["a", "b"], [1.0, 0.0])
    assert abs(run(pipe) - with_a).max() < 1e-5
    pipe.set_adapters(["a", "b"], [0.0, 0.0])
    assert abs(run(pipe) - base).max() < 1e-5
    pipe.set_adapters(["a", "b"], [0.5, 0.5])
    mixed = run(pipe)
    assert abs(mixed - base).max() > 1e-3
    pipe.fuse_lora()
    assert abs(run(pipe) - mixed).max() < 1e-4  # fused weights give the same images
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert abs(run(pipe) - base).max() < 1e-4


def test_lora_for_another_model_and_pickle_are_refused(tokenizer, tmp_path):
    adapted(tokenizer, "unet", 1).save_lora_weights(tmp_path / "unet.safetensors")
    dit = components.pipeline(tokenizer, "transformer")
    with pytest.raises(
        ValueError, match=r"unet.safetensors is a LoRA for unet; this pipeline's denoiser is `transformer`"
    ):
        dit.load_lora_weights(tmp_path / "unet.safetensors")
    # A DiT LoRA trained on a DiT with another text width: same key names, other shapes.
    other = TextToImagePipeline(**{**dit.components, "transformer": components.dit(cross_dim=16)})
    torch.manual_seed(0)
    other.transformer.add_adapter(LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    other.save_lora_weights(tmp_path / "other.safetensors")
    with pytest.raises(
        ValueError, match=r"other.safetensors does not fit this DiT \(another model's LoRA\?\)"
    ):
        dit.load_lora_weights(tmp_path / "other.safetensors")
    torch.save({}, tmp_path / "x.bin")
    with pytest.raises(ValueError, match="only .safetensors LoRA files are loaded"):
        dit.load_lora_weights(tmp_path / "x.bin")


def test_cli_lora_flag_and_wrong_lora(tokenizer, tmp_path, capsys):
    import json

    from PIL import Image

    from gen.cli import main

    pipe = adapted(tokenizer, "transformer", 3)
    pipe.save_lora_weights(tmp_path / "style.safetensors")
    pipe.unload_lora_weights()
    pipe.save_pretrained(tmp_path / "model")
    base = ["a red circle", "--model", str(tmp_path / "model"), "--steps", "3", "--seed", "1"]
    assert main([*base, "-o", str(tmp_path / "plain.png")]) == 0
    assert (
        main([*base, "-o", str(tmp_path / "lora.png"), "--lora", f"{tmp_path / 'style.safetensors'}:0.8"])
        == 0
    )
    assert Image.open(tmp_path / "plain.png").tobytes() != Image.open(tmp_path / "lora.png").tobytes()
    assert json.loads(Image.open(tmp_path / "lora.png").text["gen"])["options"]["lora"] == [
        f"{tmp_path / 'style.safetensors'}:0.8"
    ]
    adapted(tokenizer, "unet", 1).save_lora_weights(tmp_path / "unet.safetensors")
    capsys.readouterr()
    assert main([*base, "-o", str(tmp_path / "bad.png"), "--lora", str(tmp_path / "unet.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "is a LoRA for unet" in err and err.count("\n") == 1 and not (tmp_path / "bad.png").exists()


TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def adapted_both(tokenizer, denoiser, seed):
    pipe = adapted(tokenizer, denoiser, seed)
    pipe.text_encoder.add_adapter(
        LoraConfig(r=2, lora_alpha=4, target_modules=TEXT_TARGETS, init_lora_weights=False)
    )
    return pipe


@pytest.mark.parametrize("denoiser", ["transformer", "unet"])
def test_text_encoder_lora_round_trip(tokenizer, tmp_path, denoiser):
    """A LoRA on denoiser and text encoder (rank 2, alpha 4: the scale must survive the file) saves, loads,
    switches and fuses as one adapter."""
    src = adapted_both(tokenizer, denoiser, 4)
    src.save_lora_weights(tmp_path / "both.safetensors")
    want = run(src)
    pipe = components.pipeline(tokenizer, denoiser)
    base = run(pipe)
    pipe.load_lora_weights(tmp_path / "both.safetensors", adapter_name="both")
    assert pipe.text_encoder.peft_config["both"].lora_alpha == 4
    assert abs(run(pipe) - want).max() < 1e-5
    pipe.set_adapters(["both"], [0.0])
    assert abs(run(pipe) - base).max() < 1e-5
    pipe.set_adapters(["both"], [1.0])
    pipe.fuse_lora()
    assert abs(run(pipe) - want).max() < 1e-4
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert abs(run(pipe) - base).max() < 1e-4
    assert not getattr(pipe.text_encoder, "peft_config", None)


def test_diffusers_reads_our_lora_file(tokenizer, tmp_path):
    """The file format is diffusers': StableDiffusionPipeline.load_lora_weights gives the same images."""
    from diffusers import StableDiffusionPipeline

    ours = components.pipeline(tokenizer, "unet")
    sd = StableDiffusionPipeline(**{k: ours.components[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
                                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    base = run(sd)
    src = adapted_both(tokenizer, "unet", 5)
    src.scheduler = sd.scheduler  # StableDiffusionPipeline rewrites an old scheduler config (steps_offset=1)
    src.save_lora_weights(tmp_path / "both.safetensors")
    want = run(src)
    sd.load_lora_weights(str(tmp_path), weight_name="both.safetensors", adapter_name="x")
    assert sd.text_encoder.peft_config["x"].lora_alpha == 4
    assert abs(run(sd) - want).max() < 1e-5 and abs(base - want).max() > 1e-3


def test_lora_with_a_broken_metadata_header_is_refused(tokenizer, tmp_path):
    from safetensors.torch import load_file, save_file

    adapted(tokenizer, "transformer", 1).save_lora_weights(tmp_path / "a.safetensors")
    weights = load_file(str(tmp_path / "a.safetensors"))
    save_file(weights, str(tmp_path / "bad.safetensors"), metadata={"lora_adapter_metadata": "{not json"})
    save_file(
        weights,
        str(tmp_path / "odd.safetensors"),
        metadata={"lora_adapter_metadata": '{"transformer.nonsense": 1}'},
    )
    pipe = components.pipeline(tokenizer, "transformer")
    with pytest.raises(
        ValueError, match="bad.safetensors: its lora_adapter_metadata header is not valid JSON"
    ):
        pipe.load_lora_weights(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"odd.safetensors does not fit this DiT"):
        pipe.load_lora_weights(tmp_path / "odd.safetensors")
