import pytest
import torch
from peft import LoraConfig

from gen.pipelines import TextToImagePipeline
from tests import components

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def run(pipe, **kwargs):
    return pipe(
        "a red circle",
        num_inference_steps=3,
        guidance_scale=5.0,  # gen's default; StableDiffusionPipeline's is 7.5
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **kwargs,
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
    sd = StableDiffusionPipeline(
        **{k: ours.components[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
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


# -- diffusers' conventions: folders, state dicts, kohya files, cross_attention_kwargs ------------------------------


def sd_twin(tokenizer):
    """gen's UNet pipeline and a StableDiffusionPipeline of equal, separate components (LoRAs load into each)."""
    from diffusers import StableDiffusionPipeline

    ref = components.pipeline(tokenizer, "unet")
    sd = StableDiffusionPipeline(
        **{k: ref.components[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd.set_progress_bar_config(disable=True)
    ours = components.pipeline(tokenizer, "unet")
    ours.scheduler = sd.scheduler  # StableDiffusionPipeline rewrites an old scheduler config (steps_offset=1)
    return ours, sd


def kohya_file(path, tokenizer):
    """A kohya-ss / A1111 LoRA for the tiny UNet and text encoder, keys written by hand from the module names, as
    kohya writes them: network_dim 4 / network_alpha 2 on linear layers (attention, MLPs, a resnet's time
    projection) and conv_dim 2 / conv_alpha 2 on the 1x1 convs; one whole text-encoder layer."""
    from safetensors.torch import save_file

    unet, text = components.unet(), components.text_encoder(tokenizer)
    block = "down_blocks.1.attentions.0.transformer_blocks.0"
    names = [f"{block}.attn1.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0")]
    names += [
        f"{block}.attn2.to_k",
        f"{block}.attn2.to_v",
        "up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q",
    ]
    names += [
        "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
        "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
    ]
    names += [
        "down_blocks.1.attentions.0.proj_in",
        "up_blocks.0.attentions.0.proj_out",
        "down_blocks.0.resnets.0.time_emb_proj",
    ]
    layers = {f"lora_unet_{n.replace('.', '_')}": dict(unet.named_modules())[n] for n in names}
    for n in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "mlp.fc1",
        "mlp.fc2",
    ):
        layers[f"lora_te_text_model_encoder_layers_0_{n.replace('.', '_')}"] = text.get_submodule(
            f"encoder.layers.0.{n}"
        )
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, layer in layers.items():
        if isinstance(layer, torch.nn.Conv2d):
            rank, alpha = 2, 2.0
            down, up = (rank, layer.in_channels, 1, 1), (layer.out_channels, rank, 1, 1)
        else:
            rank, alpha = 4, 2.0
            down, up = (rank, layer.in_features), (layer.out_features, rank)
        state[f"{key}.lora_down.weight"] = torch.randn(down, generator=gen) * 0.3
        state[f"{key}.lora_up.weight"] = torch.randn(up, generator=gen) * 0.3
        state[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": "4"})
    return path


def test_kohya_lora_gives_stable_diffusion_pipeline_images(tokenizer, tmp_path):
    ours, sd = sd_twin(tokenizer)
    base = run(ours)
    file = kohya_file(tmp_path / "style.safetensors", tokenizer)
    assert ours.load_lora_weights(file, adapter_name="k") == "k"
    sd.load_lora_weights(str(file), adapter_name="k")
    # Every kohya module got its adapter, with kohya's alphas: 2/4 on linear layers, 2/2 on the convs.
    scales = {
        n: m.scaling["k"]
        for n, m in [*ours.unet.named_modules(), *ours.text_encoder.named_modules()]
        if hasattr(m, "scaling")
    }
    assert len(scales) == 18 and scales["down_blocks.1.attentions.0.proj_in"] == 1.0
    assert (
        scales["encoder.layers.0.self_attn.q_proj"]
        == scales["mid_block.attentions.0.transformer_blocks.0.ff.net.2"]
        == 0.5
    )
    want = run(sd)
    diff = abs(run(ours) - want).max()
    assert diff < 1e-5, diff  # measured 4.8e-7
    assert abs(want - base).max() > 1e-2
    ours.unload_lora_weights()
    assert abs(run(ours) - base).max() < 1e-5


def test_kohya_lora_through_the_cli_path(tokenizer, tmp_path):
    from gen.generation import Options, prepare

    ours, sd = sd_twin(tokenizer)
    file = kohya_file(tmp_path / "style.safetensors", tokenizer)
    prepare(ours, Options(lora=[f"{file}:0.8"]))
    sd.load_lora_weights(str(file), adapter_name="x")
    full = run(sd)
    sd.set_adapters(["x"], [0.8])
    want = run(sd)
    diff = abs(run(ours) - want).max()
    assert diff < 1e-5, diff  # measured 4.5e-7
    assert abs(full - want).max() > 1e-3  # the weight 0.8 matters


def test_diffusers_dreambooth_lora_file_loads(tokenizer, tmp_path):
    """What diffusers' train_dreambooth_lora.py writes: `unet.…` / `text_encoder.…` keys in diffusers' old
    lora.down/lora.up naming, no adapter metadata, in OUTPUT/pytorch_lora_weights.safetensors."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    src = adapted_both(tokenizer, "unet", 6)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "run",
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(src.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(src.text_encoder)),
    )
    ours, sd = sd_twin(tokenizer)
    base = run(ours)
    ours.load_lora_weights(tmp_path / "run")
    sd.load_lora_weights(str(tmp_path / "run"), weight_name="pytorch_lora_weights.safetensors")
    want = run(sd)
    diff = abs(run(ours) - want).max()
    assert diff < 1e-5, diff  # measured 0.0
    assert abs(want - base).max() > 1e-3


@pytest.mark.parametrize("form", ["folder", "weight_name", "subfolder", "state_dict"])
def test_folder_weight_name_and_state_dict_load_like_the_file(tmp_path, form):
    # A tokenizer of its own: diffusers' unload_textual_inversion leaves a tokenizer's decode broken under
    # transformers 5 (it then joins tokens with their "</w>" marks), so the session's shared one must not see it.
    tokenizer = components.write_tokenizer(tmp_path / "tokenizer")
    from safetensors.torch import load_file, save_file

    src = adapted(tokenizer, "transformer", 7)  # rank = alpha: a state dict carries no LoraConfig header
    want = run(src)
    (tmp_path / "run").mkdir()
    src.save_lora_weights(tmp_path / "run" / "pytorch_lora_weights.safetensors")
    src.save_lora_weights(tmp_path / "run" / "style.safetensors")
    token = torch.randn(32, generator=torch.Generator().manual_seed(0))
    save_file({"<dog>": token}, str(tmp_path / "run" / "pytorch_lora_weights_emb.safetensors"))
    style = {"weight_name": "style.safetensors"}
    source, kwargs = {
        "folder": (tmp_path / "run", {}),
        "weight_name": (str(tmp_path / "run"), style),
        "subfolder": (tmp_path, {"subfolder": "run", "local_files_only": True, **style}),
        "state_dict": (load_file(str(tmp_path / "run" / "style.safetensors")), {}),
    }[form]
    pipe = components.pipeline(tokenizer, "transformer")
    base = run(pipe)
    assert pipe.load_lora_weights(source, **kwargs) == "adapter_0"
    assert pipe.load_lora_weights(source, adapter_name="again", **kwargs) == "again"
    pipe.set_adapters(["adapter_0", "again"], [1.0, 0.0])
    assert abs(run(pipe) - want).max() < 1e-5 and abs(want - base).max() > 1e-3
    # The DreamBooth identifier beside pytorch_lora_weights.safetensors comes with the folder, not with the others.
    assert ("<dog>" in pipe.tokenizer.get_vocab()) == (form == "folder")
    pipe.unload_lora_weights()
    assert "<dog>" not in pipe.tokenizer.get_vocab()


def test_cli_lora_takes_a_folder(tokenizer, tmp_path):
    from gen.generation import Options, prepare

    src = adapted(tokenizer, "transformer", 8)
    (tmp_path / "run").mkdir()
    src.save_lora_weights(tmp_path / "run" / "pytorch_lora_weights.safetensors")
    src.set_adapters(["default"], [0.5])
    want = run(src)
    pipe = prepare(components.pipeline(tokenizer, "transformer"), Options(lora=[f"{tmp_path / 'run'}:0.5"]))
    assert abs(run(pipe) - want).max() < 1e-5


def test_cross_attention_scale_equals_stable_diffusion_pipeline(tokenizer, tmp_path):
    import inspect

    from gen.pipelines import TextToImagePipeline

    assert "cross_attention_kwargs" in inspect.signature(TextToImagePipeline.__call__).parameters
    ours, sd = sd_twin(tokenizer)
    file = kohya_file(tmp_path / "style.safetensors", tokenizer)  # denoiser and text encoder
    ours.load_lora_weights(file)
    sd.load_lora_weights(str(file))
    full = run(sd)
    half = run(sd, cross_attention_kwargs={"scale": 0.5})
    diff = abs(run(ours, cross_attention_kwargs={"scale": 0.5}) - half).max()
    assert diff < 1e-5, diff  # measured 5.4e-7
    assert abs(half - full).max() > 1e-3
    assert abs(run(ours) - full).max() < 1e-5  # the scale lasts one call


def scaled(pipe, scale):
    return run(pipe, cross_attention_kwargs={"scale": scale})


def test_cross_attention_scale_on_the_dit(tokenizer, tmp_path):
    src = adapted_both(tokenizer, "transformer", 9)
    src.save_lora_weights(tmp_path / "both.safetensors")
    pipe = components.pipeline(tokenizer, "transformer")
    base = run(pipe)
    pipe.load_lora_weights(tmp_path / "both.safetensors")
    lora = run(pipe)
    assert abs(lora - base).max() > 1e-3
    assert abs(scaled(pipe, 0.0) - base).max() < 1e-5  # both the DiT's and the text encoder's LoRA off
    assert abs(scaled(pipe, 1.0) - lora).max() < 1e-5
    half = scaled(pipe, 0.5)
    assert abs(half - base).max() > 1e-4 and abs(half - lora).max() > 1e-4
    assert abs(run(pipe) - lora).max() < 1e-5  # the scale lasts one call
    # ... and the text encoder is unscaled as soon as the prompt is encoded, as in StableDiffusionPipeline.
    with torch.no_grad():
        emb = pipe.encode_prompt("a red circle", "cpu", do_classifier_free_guidance=False)[0]
        scaled(pipe, 0.5)
        assert torch.allclose(
            pipe.encode_prompt("a red circle", "cpu", do_classifier_free_guidance=False)[0], emb
        )
    with pytest.raises(ValueError, match=r"cross_attention_kwargs\['scale'\] 'x' must be a finite number"):
        scaled(pipe, "x")
    assert abs(run(pipe) - lora).max() < 1e-5


def test_lora_sources_are_refused_with_one_line_errors(tokenizer, tmp_path):
    from safetensors.torch import save_file

    dit = components.pipeline(tokenizer, "transformer")
    with pytest.raises(
        FileNotFoundError, match=r"LoRA '.*nope' does not exist; .* \(nothing is downloaded\)"
    ):
        dit.load_lora_weights(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"LoRA 'someone/style' does not exist"):
        dit.load_lora_weights("someone/style")  # a hub id: never downloaded
    (tmp_path / "run").mkdir()
    adapted(tokenizer, "transformer", 1).save_lora_weights(tmp_path / "run" / "style.safetensors")
    with pytest.raises(
        FileNotFoundError,
        match=r"run/pytorch_lora_weights.safetensors does not exist; pass weight_name= .*\(style.safetensors\)",
    ):
        dit.load_lora_weights(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"run/other.safetensors does not exist"):
        dit.load_lora_weights(tmp_path / "run", weight_name="other.safetensors")
    kohya_file(tmp_path / "kohya.safetensors", tokenizer)
    with pytest.raises(
        ValueError, match=r"kohya.safetensors is a kohya / A1111 LoRA .* for Stable Diffusion UNets"
    ):
        dit.load_lora_weights(tmp_path / "kohya.safetensors")
    torch.save({}, tmp_path / "run" / "pytorch_lora_weights.bin")
    for kwargs in ({}, {"weight_name": "pytorch_lora_weights.bin"}):
        with pytest.raises(
            ValueError, match=r"pytorch_lora_weights.bin: only .safetensors LoRA files are loaded"
        ):
            dit.load_lora_weights(tmp_path / "run", **kwargs)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['hotswap'\]"):
        dit.load_lora_weights(tmp_path / "run", weight_name="style.safetensors", hotswap=True)
    with pytest.raises(ValueError, match=r"the LoRA state dict's 'a' is not a tensor \(str\)"):
        dit.load_lora_weights({"a": "b"})
    with pytest.raises(
        ValueError, match=r"is not a LoRA: its key 'transformer.proj_out.weight' names no LoRA"
    ):
        dit.load_lora_weights({"transformer.proj_out.weight": torch.zeros(2, 2)})
    save_file({"x": torch.zeros(1)}, str(tmp_path / "run" / "pytorch_lora_weights.safetensors"))
    with pytest.raises(ValueError, match=r"is not a LoRA: its key 'x'"):
        components.pipeline(tokenizer, "unet").load_lora_weights(tmp_path / "run")
    assert not getattr(dit.transformer, "peft_config", None)


def test_diffusers_classmethod_save_and_a_text_encoder_only_lora(tokenizer, tmp_path):
    """`Pipeline.save_lora_weights(save_directory, text_encoder_lora_layers=...)` is diffusers' own classmethod;
    a LoRA adapting only the text encoder loads (as in diffusers) and gives the adapted pipeline's pictures."""
    from peft.utils import get_peft_model_state_dict

    pipe = components.pipeline(tokenizer, "unet")
    plain = run(pipe)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    pipe.text_encoder.add_adapter(config)
    adapted_images = run(pipe)
    TextToImagePipeline.save_lora_weights(
        save_directory=tmp_path, text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder)
    )
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    fresh = components.pipeline(tokenizer, "unet")
    fresh.load_lora_weights(tmp_path, low_cpu_mem_usage=True)
    again = run(fresh)
    assert abs(again - adapted_images).max() < 1e-5 and abs(again - plain).max() > 1e-3
