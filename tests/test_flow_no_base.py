"""SD3/Flux single files without a diffusers folder: gen's shipped configs and tokenizers (gen.pipelines.flow_configs)
stand in for `--base`, each size read from the weights, and the VAE and text encoders come from the file (all-in-one)
or from separate files of the layouts ComfyUI users keep (clip_l / clip_g / t5xxl_fp16 / ae.safetensors).

The tiny parts here keep what the shipped configs fix and the weights cannot tell (64-wide heads, activations, 32
norm groups, T5's 32 position buckets, CLIP's and T5's real vocabularies), so the shipped tokenizers fit them; the
images must equal diffusers' StableDiffusion3Pipeline built from the same parts by hand."""

from __future__ import annotations

import json
import lzma
import re

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from safetensors.torch import save_file
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from gen.loading.pipeline import load_pipeline
from gen.pipelines.flow_configs import FLOW, config_folder, templates
from gen.pipelines.flow_export import export_sd3
from gen.pipelines.flow_parts import PREFIX as PREFIX_FLUX
from gen.pipelines.flow_parts import file_sources, packed_sources, transformer_source
from gen.pipelines.single_file import TOKENIZER, clip_to_original, vae_to_original
from tests.test_flow_all_in_one import t5_to_original

CALL = {"prompt": "a red circle", "num_inference_steps": 3, "height": 32, "width": 32, "output_type": "np"}


def clip(width: int, act: str, seed: int) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=2 * width,
        num_attention_heads=width // 64,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=width,
        hidden_act=act,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return CLIPTextModelWithProjection(config).eval()


def t5() -> T5EncoderModel:
    torch.manual_seed(3)
    config = T5Config(
        vocab_size=32128,
        d_model=64,
        d_kv=32,
        d_ff=96,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=32,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def parts(tmp_path) -> dict:
    """A tiny SD3 whose every unread setting is the real one's."""
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=64,
        num_attention_heads=2,
        caption_projection_dim=128,
        joint_attention_dim=64,
        pooled_projection_dim=64 + 128,
        out_channels=16,
        pos_embed_max_size=16,
    ).eval()
    torch.manual_seed(1)
    vae = AutoencoderKL(
        block_out_channels=(32,),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=1.5305,
        shift_factor=0.0609,
    ).eval()
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "tokenizer.json").write_bytes(
        lzma.decompress((FLOW / "t5_tokenizer.json.xz").read_bytes())
    )
    clip_l = clip(64, "quick_gelu", 1)
    with torch.no_grad():  # SD3 files hold no CLIP-L projection; diffusers gives it the identity
        clip_l.text_projection.weight.copy_(torch.eye(64))
    return {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "vae": vae,
        "text_encoder": clip_l,
        "tokenizer": CLIPTokenizer.from_pretrained(TOKENIZER),
        "text_encoder_2": clip(128, "gelu", 2),
        "tokenizer_2": CLIPTokenizer.from_pretrained(TOKENIZER, pad_token="!"),
        "text_encoder_3": t5(),
        "tokenizer_3": T5TokenizerFast.from_pretrained(tmp_path / "t5", model_max_length=512),
    }


def write(state: dict, path) -> str:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    root = tmp_path_factory.mktemp("no-base")
    p = parts(root)
    names = {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5xxl"}
    packed = {}
    for name, kind in names.items():
        if kind == "t5xxl":
            packed |= t5_to_original(p[name])
        else:
            state = clip_to_original(p[name], f"text_encoders.{kind}.transformer.")
            if kind == "clip_l":  # as in Stability's files
                state.pop(f"text_encoders.{kind}.transformer.text_projection.weight")
            packed |= state
    transformer = export_sd3(p["transformer"])
    files = {
        "all": write(transformer | vae_to_original(p["vae"]) | packed, root / "sd3_all.safetensors"),
        "transformer": write(transformer, root / "sd3_transformer.safetensors"),
        # the separate files as ComfyUI users download them: transformers' names, no prefix; the VAE's original
        "clip_l": write(clip_to_original(p["text_encoder"], ""), root / "clip_l.safetensors"),
        "clip_g": write(clip_to_original(p["text_encoder_2"], ""), root / "clip_g.safetensors"),
        "t5xxl": write(t5_to_original(p["text_encoder_3"], prefix=""), root / "t5xxl_fp16.safetensors"),
        "vae": write(vae_to_original(p["vae"], ""), root / "ae.safetensors"),
    }
    reference = StableDiffusion3Pipeline(**p)
    return {"root": root, "files": files, "reference": images(reference), "parts": p}


def images(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(**CALL, generator=torch.Generator().manual_seed(0)).images


def test_the_configs_written_for_a_file_are_its_models(sd3, tmp_path):
    """Every size read from the weights: the configs describe the parts they were exported from."""
    f = sd3["files"]
    sources = packed_sources(f["all"], "sd3")
    folder = config_folder("sd3", transformer_source(f["all"]), sources, tmp_path)
    p = sd3["parts"]
    written = json.loads((folder / "transformer" / "config.json").read_text())
    for key in (
        "num_layers",
        "num_attention_heads",
        "attention_head_dim",
        "joint_attention_dim",
        "patch_size",
    ):
        assert written[key] == p["transformer"].config[key], key
    assert written["pos_embed_max_size"] == 16 and written["qk_norm"] is None
    vae = json.loads((folder / "vae" / "config.json").read_text())
    assert (
        vae["block_out_channels"] == [32] and vae["layers_per_block"] == 1 and vae["scaling_factor"] == 1.5305
    )
    g = json.loads((folder / "text_encoder_2" / "config.json").read_text())
    assert (g["hidden_size"], g["num_attention_heads"], g["num_hidden_layers"], g["hidden_act"]) == (
        128,
        2,
        2,
        "gelu",
    )
    t = json.loads((folder / "text_encoder_3" / "config.json").read_text())
    assert (t["d_model"], t["num_heads"], t["d_kv"], t["d_ff"], t["num_layers"]) == (64, 2, 32, 96, 2)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"


def test_an_all_in_one_file_loads_alone_and_gives_diffusers_images(sd3):
    pipe = load_pipeline(sd3["files"]["all"])
    assert np.abs(images(pipe) - sd3["reference"]).max() < 1e-4
    assert pipe.scheduler.config.shift == 3.0
    assert len(pipe.tokenizer_3) == 32100 and pipe.tokenizer_2.pad_token == "!"


def test_a_transformer_file_with_comfyui_part_files_gives_diffusers_images(sd3):
    f = sd3["files"]
    pipe = load_pipeline(
        f["transformer"], text_encoders=[f["t5xxl"], f["clip_g"], f["clip_l"]], vae=f["vae"]
    )  # any order: the kinds and CLIP-L/G are read from the weights
    assert np.abs(images(pipe) - sd3["reference"]).max() < 1e-4


def test_part_files_win_over_packed_parts(sd3, tmp_path):
    """The file's own VAE is replaced by the one given, as A1111's VAE setting replaces a checkpoint's."""
    other = AutoencoderKL.from_config(sd3["parts"]["vae"].config)
    vae = write(vae_to_original(other, ""), tmp_path / "other_vae.safetensors")
    pipe = load_pipeline(sd3["files"]["all"], vae=vae)
    assert all(torch.equal(v, pipe.vae.state_dict()[k]) for k, v in other.state_dict().items())


def test_sd3_runs_without_t5_as_diffusers_allows(sd3):
    f = sd3["files"]
    pipe = load_pipeline(f["transformer"], text_encoders=[f["clip_l"], f["clip_g"]], vae=f["vae"])
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert images(pipe).shape == (1, 32, 32, 3)


@pytest.mark.parametrize(
    "given, message",
    [
        (
            {},
            "sd3_transformer.safetensors is an SD3 transformer file without VAE, CLIP-L, CLIP-G; give the part",
        ),
        ({"text_encoders": ["vae"]}, "--text-encoder ae.safetensors: a VAE file; give it as --vae"),
        (
            {"vae": "t5xxl"},
            "--vae t5xxl_fp16.safetensors: a T5 text encoder file; give it as --text-encoder",
        ),
        ({"text_encoders": ["transformer"]}, "sd3_transformer.safetensors: not a text encoder or VAE file"),
        ({"text_encoders": ["clip_l", "clip_l", "clip_g"]}, "3 CLIP files given; SD3 takes 2"),
        ({"text_encoders": ["t5xxl", "t5xxl"]}, "2 T5 files given, one is taken"),
    ],
)
def test_missing_or_misplaced_parts_are_one_line(sd3, given, message):
    f = sd3["files"]
    kwargs = {k: [f[x] for x in v] if isinstance(v, list) else f[v] for k, v in given.items()}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as e:
        load_pipeline(f["transformer"], **kwargs)
    assert "\n" not in str(e.value)


def test_part_files_are_refused_for_other_models(sd3, tmp_path):
    with pytest.raises(ValueError, match="are for SD3/Flux transformer files"):
        load_pipeline(None, vae=sd3["files"]["vae"])


def test_one_clip_file_fills_the_slot_the_file_leaves(sd3, tmp_path):
    """An all-in-one file without CLIP-G (cut here) takes a lone CLIP file as CLIP-G, whatever its width."""
    from safetensors.torch import load_file

    state = {k: v for k, v in load_file(sd3["files"]["all"]).items() if "clip_g" not in k}
    cut = write(state, tmp_path / "no_g.safetensors")
    have = set(packed_sources(cut, "sd3"))
    assert set(file_sources([sd3["files"]["clip_g"]], "sd3", have)) == {"text_encoder_2"}
    pipe = load_pipeline(cut, text_encoders=[sd3["files"]["clip_g"]])
    assert np.abs(images(pipe) - sd3["reference"]).max() < 1e-4


def test_the_shipped_configs_are_the_real_models_on_the_meta_device():
    """Built on the meta device from the shipped configs: SD3 medium's, SD3.5 large's and Flux.1's parameter counts
    (the published ones: 2.03 B, 8.06 B, 11.90 B; CLIP-L 123.1 M, CLIP-G 694.7 M, T5-XXL encoder 4.76 B)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel

    t = templates()

    def count(
        model,
    ) -> float:  # T5's encoder.embed_tokens is `shared` once loaded (tie_weights), so counted once
        named = model.named_parameters(remove_duplicate=False)
        return sum(p.numel() for n, p in named if n != "encoder.embed_tokens.weight") / 1e9

    with init_empty_weights():
        sd3 = SD3Transformer2DModel.from_config(t["transformer"]["sd3"])
        large = SD3Transformer2DModel.from_config(
            dict(t["transformer"]["sd3"], num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                 qk_norm="rms_norm")
        )  # fmt: skip
        flux = FluxTransformer2DModel.from_config(t["transformer"]["flux"])
        l_ = CLIPTextModel(CLIPTextConfig(**t["text_encoder"]["clip_l"]))
        g = CLIPTextModelWithProjection(CLIPTextConfig(**t["text_encoder"]["clip_g"]))
        xxl = T5EncoderModel(T5Config(**t["text_encoder"]["t5xxl"]))
    assert round(count(sd3), 2) == 2.03
    assert round(count(large), 2) == 8.06
    assert round(count(flux), 2) == 11.90
    assert round(count(l_) * 1000, 1) == 123.1
    assert round(count(g) * 1000, 1) == 694.7
    assert round(count(xxl), 2) == 4.76


@pytest.mark.slow
def test_a_flux1_file_with_comfyui_part_files_gives_diffusers_images(tmp_path):
    """Flux.1-dev's layout (3072 wide, as diffusers' converter needs; one double and one single block), with
    clip_l / t5xxl / ae files beside it and no folder: the images FluxPipeline gives on the same parts, and the
    dev schedule (dynamic shifting) chosen because the file has a guidance embedding."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    from gen.pipelines.flow_export import export_flux

    p = parts(tmp_path)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        axes_dims_rope=[16, 56, 56],
        guidance_embeds=True,
    ).eval()
    torch.manual_seed(1)
    clip_l = CLIPTextModel(p["text_encoder"].config).eval()
    vae = AutoencoderKL.from_config(dict(p["vae"].config, scaling_factor=0.3611, shift_factor=0.1159)).eval()
    files = [
        write(clip_to_original(clip_l, ""), tmp_path / "clip_l.safetensors"),
        write(t5_to_original(p["text_encoder_3"], prefix=""), tmp_path / "t5xxl_fp16.safetensors"),
    ]
    ae = write(vae_to_original(vae, ""), tmp_path / "ae.safetensors")
    dev = write(export_flux(transformer), tmp_path / "flux1-dev.safetensors")
    ours = load_pipeline(dev, text_encoders=files, vae=ae)
    assert ours.scheduler.config.use_dynamic_shifting and ours.transformer.config.guidance_embeds
    reference = FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**templates()["scheduler"]["flux-dev"]),
        vae=vae,
        text_encoder=clip_l,
        tokenizer=p["tokenizer"],
        text_encoder_2=p["text_encoder_3"],
        tokenizer_2=p["tokenizer_3"],
    )
    call = dict(CALL, num_inference_steps=2, max_sequence_length=16, guidance_scale=3.5)
    for pipe in (ours, reference):
        pipe.set_progress_bar_config(disable=True)
    got, want = (
        pipe(**call, generator=torch.Generator().manual_seed(0)).images for pipe in (ours, reference)
    )
    assert np.abs(got - want).max() < 1e-4


def test_the_cli_and_the_server_take_part_files_and_the_png_reproduces(sd3, tmp_path):
    """`gen --model transformer.safetensors --text-encoder ... --vae ...` with no folder: the PNG records the part
    files, `gen reproduce --verify` makes it again, and `gen serve` given the same files serves the same image."""
    import base64

    from gen.cli import main
    from gen.generation import metadata
    from gen.serve.models import Models
    from tests.images import assert_same_image
    from tests.serve_support import cli_image, png, serving

    f = sd3["files"]
    encoders = [f["clip_l"], f["clip_g"], f["t5xxl"]]
    flags = [x for e in encoders for x in ("--text-encoder", e)] + ["--vae", f["vae"]]
    common = ["--steps", "3", "--width", "32", "--height", "32", "--dtype", "fp32", "--cfg", "7"]
    cli = cli_image(tmp_path, "a red circle", 4, "--model", f["transformer"], *flags, *common)
    models = Models.load([f["transformer"]], "cpu", "fp32", "sdpa", part_files=encoders, vae=f["vae"])
    call = {"prompt": "a red circle", "seed": 4, "steps": 3, "width": 32, "height": 32, "cfg_scale": 7}
    with serving(models=models) as server, server.client() as http:
        answer = http.post("/sdapi/v1/txt2img", json=call)
        assert answer.status_code == 200, answer.text
    assert_same_image(png(answer.json()["images"][0]), cli)
    served = tmp_path / "served.png"
    served.write_bytes(base64.b64decode(answer.json()["images"][0]))
    record = metadata.read(served)
    assert record["options"]["text_encoder"] == encoders and record["options"]["vae"] == f["vae"]
    assert record["options"]["base"] is None
    assert main(["reproduce", str(served), "--verify"]) == 0


def test_the_configs_read_from_real_sized_weights_are_the_released_ones():
    """SD3 Medium, SD3.5 Large and Medium (QK norm, dual attention in the first 13 layers), Flux.1 dev and schnell,
    their VAEs, CLIP-L, CLIP-G and T5-XXL, built on the meta device and written in the files' layouts (gen's own
    exports): the configs gen writes from those shapes are the released ones."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from gen.pipelines import flow_configs as fc
    from gen.pipelines.flow_export import export_flux
    from gen.pipelines.flow_parts import PREFIX

    t = templates()

    def shapes(state: dict) -> dict:
        return {k.removeprefix(PREFIX): tuple(v.shape) for k, v in state.items()}

    sd3 = t["transformer"]["sd3"]
    released = {
        "sd3 medium": sd3,
        "sd3.5 large": dict(
            sd3, num_layers=38, num_attention_heads=38, caption_projection_dim=2432, qk_norm="rms_norm"
        ),
        "sd3.5 medium": dict(
            sd3, pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=list(range(13))
        ),
    }
    with init_empty_weights():
        for name, config in released.items():
            model = SD3Transformer2DModel.from_config(config)
            got = fc.sd3_transformer(shapes(export_sd3(model)), sd3)
            assert got == config, name
        for guidance in (True, False):
            config = dict(t["transformer"]["flux"], guidance_embeds=guidance)
            model = FluxTransformer2DModel.from_config(config)
            assert fc.flux_transformer(shapes(export_flux(model)), t["transformer"]["flux"]) == config
        for family in ("sd3", "flux"):
            model = AutoencoderKL.from_config(t["vae"][family])
            assert fc.vae(shapes(vae_to_original(model, "")), t["vae"][family]) == t["vae"][family]
        for kind in ("clip_l", "clip_g"):
            model = CLIPTextModelWithProjection(CLIPTextConfig(**t["text_encoder"][kind]))
            written = fc.clip(shapes(clip_to_original(model, "")), t["text_encoder"][kind])
            assert written == t["text_encoder"][kind], kind
        model = T5EncoderModel(T5Config(**t["text_encoder"]["t5xxl"]))
        written = fc.t5(shapes(t5_to_original(model, prefix="")), t["text_encoder"]["t5xxl"])
        assert written == t["text_encoder"]["t5xxl"]


def test_part_folders_load_with_their_own_configs(sd3, tmp_path):
    """A T5 folder (google/t5-v1_1-xxl's layout, a repo's text_encoder_3), a CLIP-G text model folder and a
    diffusers VAE folder stand in for files; a CLIP folder without the projection SD3 reads is refused in one line,
    not run with a random one."""
    from transformers import CLIPTextModel

    p, f = sd3["parts"], sd3["files"]
    p["text_encoder_3"].save_pretrained(tmp_path / "t5")
    p["text_encoder_2"].save_pretrained(tmp_path / "clip_g")
    p["vae"].save_pretrained(tmp_path / "vae")
    pipe = load_pipeline(
        f["transformer"],
        text_encoders=[f["clip_l"], tmp_path / "clip_g", tmp_path / "t5"],
        vae=tmp_path / "vae",
    )
    assert np.abs(images(pipe) - sd3["reference"]).max() < 1e-4
    CLIPTextModel(p["text_encoder_2"].config).save_pretrained(tmp_path / "bare")
    with pytest.raises(
        ValueError, match="bare: the text_encoder_2 .CLIPTextModelWithProjection. needs weights"
    ) as e:
        load_pipeline(f["transformer"], text_encoders=[f["clip_l"], tmp_path / "bare"], vae=f["vae"])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="empty: a folder without a readable config.json"):
        (tmp_path / "empty").mkdir()
        load_pipeline(f["transformer"], text_encoders=[tmp_path / "empty"], vae=f["vae"])


def test_parts_that_do_not_fit_the_transformer_are_one_line(sd3, tmp_path):
    """Caught before any weight is read, not as a shape error at the first step or at the decode: a CLIP given
    twice, an SD 1.x VAE (4 latent channels), a T5 of another width, a transformer file of another layout."""
    from safetensors.torch import load_file

    p, f = sd3["parts"], sd3["files"]
    torch.manual_seed(0)
    sd_vae = AutoencoderKL(
        block_out_channels=(32,), layers_per_block=1, latent_channels=4, norm_num_groups=32
    )
    other_t5 = T5EncoderModel(T5Config(**dict(p["text_encoder_3"].config.to_dict(), d_model=32, d_kv=16)))
    cut = {k: v for k, v in load_file(f["transformer"]).items() if "y_embedder" not in k}
    cases = [
        (
            {"text_encoders": [f["clip_l"], f["clip_l"], f["t5xxl"]], "vae": f["vae"]},
            "the text encoders pool clip_l.safetensors 64 + clip_l.safetensors 64 wide; this SD3 transformer reads"
            " 192 (is a CLIP given twice",
        ),
        (
            {"text_encoders": [f["clip_l"], f["clip_g"]], "vae": write(vae_to_original(sd_vae, ""), tmp_path / "sd.safetensors")},
            "sd.safetensors: a VAE with 4 latent channels; this SD3 transformer reads 16",
        ),
        (
            {"text_encoders": [f["clip_l"], f["clip_g"], write(t5_to_original(other_t5, prefix=""), tmp_path / "t5.safetensors")], "vae": f["vae"]},
            "t5.safetensors: a T5 32 wide; this SD3 transformer reads 64",
        ),
    ]  # fmt: skip
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)) as e:
            load_pipeline(f["transformer"], **kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(
        ValueError, match="cut.safetensors: not the SD3 transformer layout gen reads .no 'y_embedder"
    ):
        load_pipeline(
            write(cut, tmp_path / "cut.safetensors"), text_encoders=[f["clip_l"], f["clip_g"]], vae=f["vae"]
        )


def test_comfyuis_scaled_fp8_t5_is_multiplied_out(sd3, tmp_path):
    """t5xxl_fp8_e4m3fn_scaled: fp8 weights with a `scale_weight` each and a `scaled_fp8` marker. Loaded as weight x
    scale (what ComfyUI computes), within fp8's precision of the original, not as the raw fp8 values."""
    original = sd3["parts"]["text_encoder_3"].state_dict()
    state = t5_to_original(sd3["parts"]["text_encoder_3"], prefix="")
    scaled = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for key, value in state.items():
        if key.endswith(".weight") and value.ndim == 2 and "embed" not in key and "shared" not in key:
            scale = value.abs().max() / 448
            scaled[key] = (value / scale).to(torch.float8_e4m3fn)
            scaled[key.removesuffix(".weight") + ".scale_weight"] = scale.reshape(1)
        else:
            scaled[key] = value
    f = sd3["files"]
    path = write(scaled, tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors")
    pipe = load_pipeline(f["transformer"], text_encoders=[f["clip_l"], f["clip_g"], path], vae=f["vae"])
    loaded = pipe.text_encoder_3.state_dict()
    q = "encoder.block.0.layer.0.SelfAttention.q.weight"
    assert torch.allclose(loaded[q], original[q], rtol=0.07, atol=1e-3)
    assert "scale_weight" not in " ".join(loaded)


def test_the_server_refuses_part_files_it_cannot_place(sd3, tmp_path):
    from gen.serve.models import check_part_flags

    flux = write(
        {PREFIX_FLUX + "double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}, tmp_path / "flux.safetensors"
    )
    with pytest.raises(ValueError, match="are for SD3/Flux transformer files; no --model is one"):
        check_part_flags([None])
    with pytest.raises(ValueError, match="would go to both the SD3 and the Flux files"):
        check_part_flags([sd3["files"]["transformer"], flux])
    check_part_flags([sd3["files"]["transformer"], sd3["files"]["all"]])  # one family: fine


def test_gen_info_says_what_a_single_file_holds_and_needs(sd3, tmp_path, capsys):
    """`gen info FILE`, from the headers only: an SD3/Flux file's model, its parts (parameters, dtype) and what it
    still needs; an SD checkpoint's version and parts."""
    from gen.cli import main
    from gen.loading.info import describe

    f, p = sd3["files"], sd3["parts"]
    info = describe(f["all"])
    assert info["pipeline"] == "SD3 (2 layers, 128 wide) single file" and info["needs"] == []
    assert list(info["components"]) == [
        "transformer",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
    ]
    assert info["components"]["text_encoder_2"]["parameters"] == sum(
        v.numel() for v in p["text_encoder_2"].state_dict().values()
    )
    assert info["components"]["transformer"]["parameters"] == sum(
        v.numel() for v in p["transformer"].state_dict().values()
    )
    assert describe(f["transformer"])["needs"] == ["VAE", "CLIP-L", "CLIP-G", "T5 (optional)"]
    assert main(["info", f["transformer"]]) == 0
    out = capsys.readouterr().out
    assert (
        "needs            VAE, CLIP-L, CLIP-G, T5 (optional) (--text-encoder / --vae files, or --base DIR)"
        in out
    )
    sd = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 9, 3, 3, dtype=torch.float16),
        "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3, dtype=torch.float16),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(
            768, dtype=torch.float16
        ),
    }
    info = describe(write(sd, tmp_path / "sd15-inpainting.safetensors"))
    assert info["pipeline"] == "SD 1.x inpainting single file"
    assert {k: (c["parameters"], c["dtype"]) for k, c in info["components"].items()} == {
        "unet": (648, "F16"),
        "vae": (144, "F16"),
        "text_encoder": (768, "F16"),
    }


def test_flux_fill_files_and_unreadable_files_are_one_line(sd3, tmp_path):
    """A Flux Fill/Control transformer (more input channels than out) is named, not fed a text-to-image VAE; gen
    info on a cut or foreign file says so in one line."""
    from gen.cli import main
    from gen.loading.info import describe

    z = torch.zeros
    fill = {
        f"{PREFIX_FLUX}double_blocks.0.img_attn.qkv.weight": z(1, dtype=torch.float16),
        f"{PREFIX_FLUX}single_blocks.0.linear1.weight": z(1, dtype=torch.float16),
        f"{PREFIX_FLUX}img_in.weight": z(3072, 384, dtype=torch.float16),
        f"{PREFIX_FLUX}txt_in.weight": z(3072, 64, dtype=torch.float16),
        f"{PREFIX_FLUX}vector_in.in_layer.weight": z(3072, 64, dtype=torch.float16),
        f"{PREFIX_FLUX}final_layer.linear.weight": z(64, 3072, dtype=torch.float16),
    }
    path = write(fill, tmp_path / "flux1-fill-dev.safetensors")
    f = sd3["files"]
    with pytest.raises(
        ValueError, match="flux1-fill-dev.safetensors: a Flux Fill/Control transformer .384 input"
    ):
        load_pipeline(path, text_encoders=[f["clip_l"], f["t5xxl"]], vae=f["vae"])
    assert describe(path)["pipeline"].startswith("Flux Fill/Control (384 input channels")
    cut = write({k: v for k, v in fill.items() if "final_layer" not in k}, tmp_path / "cut.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    for bad, message in ((cut, "not the FLUX transformer layout gen reads"), (tmp_path / "broken.safetensors", "not a .safetensors file gen can read")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            describe(bad)
        assert main(["info", str(bad)]) == 2
