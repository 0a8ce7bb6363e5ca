"""A diffusers folder of configs for an SD3 or Flux single file, written offline: what lets a file (and the separate
text-encoder and VAE files ComfyUI users keep beside it) load without the model's diffusers folder (`--base`).

diffusers' own `from_single_file` fetches these configs from the Hub by the model it guesses; gen never reaches the
network, so it ships the real models' configs (gen/assets/flow_configs/flow.json) and reads from the weights every
size they fix: the transformer's width, depth, patch, positions, SD3.5's QK norm and dual-attention layers, Flux's
guidance embedding (dev or schnell, which also picks the schedule); the VAE's blocks; each text encoder's width,
depth and vocabulary. What the weights cannot tell (head widths, activations, norms, the schedule's shift) comes from
the shipped configs, which are the values every released SD3, SD3.5 and Flux.1 model uses. The tokenizers are CLIP's
BPE (shipped for the SD configs already) and T5 v1.1's unigram vocabulary (gen/assets/flow_configs/T5_TOKENIZER.md).
"""

from __future__ import annotations

import copy
import json
import lzma
import math
from pathlib import Path

from gen.pipelines.flow_parts import PACKED_TEXT, Folder, Source, count_indices
from gen.pipelines.single_file import ASSETS, TOKENIZER

CLIP_VOCAB = TOKENIZER  # CLIP's full BPE vocabulary, as the SD configs use it
FLOW = ASSETS / "flow_configs"
HEAD_WIDTH = {"clip": 64, "sd3": 64}  # every released CLIP-L/G and SD3/SD3.5 transformer


def templates() -> dict:
    return json.loads((FLOW / "flow.json").read_text())


def sd3_transformer(shapes: dict[str, tuple], base: dict) -> dict:
    """SD3/SD3.5's transformer config from the file's shapes (Stability's key names, no prefix)."""
    width, in_channels, patch, _ = shapes["x_embedder.proj.weight"]
    depth = count_indices(shapes, r"joint_blocks\.(\d+)\.")
    final = shapes["final_layer.linear.weight"][0]
    config = dict(
        base,
        in_channels=in_channels,
        patch_size=patch,
        out_channels=final // (patch * patch),
        num_layers=depth,
        attention_head_dim=HEAD_WIDTH["sd3"],
        num_attention_heads=width // HEAD_WIDTH["sd3"],
        caption_projection_dim=width,
        joint_attention_dim=shapes["context_embedder.weight"][1],
        pooled_projection_dim=shapes["y_embedder.mlp.0.weight"][1],
        pos_embed_max_size=math.isqrt(shapes["pos_embed"][1]),
        qk_norm="rms_norm" if "joint_blocks.0.x_block.attn.ln_q.weight" in shapes else None,
        dual_attention_layers=[
            i for i in range(depth) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes
        ],
    )
    return config


def flux_transformer(shapes: dict[str, tuple], base: dict) -> dict:
    """Flux.1's transformer config: depths, guidance embedding and input widths from the file. diffusers' Flux
    converter assumes Flux.1's width (3072), so the head layout stays the shipped one."""
    out, in_channels = shapes["final_layer.linear.weight"][0], shapes["img_in.weight"][1]
    return dict(
        base,
        **({"out_channels": out} if out != in_channels else {}),  # Flux Fill/Depth: more in than out
        num_layers=count_indices(shapes, r"double_blocks\.(\d+)\."),
        num_single_layers=count_indices(shapes, r"single_blocks\.(\d+)\."),
        guidance_embeds=any(k.startswith("guidance_in.") for k in shapes),
        in_channels=shapes["img_in.weight"][1],
        joint_attention_dim=shapes["txt_in.weight"][1],
        pooled_projection_dim=shapes["vector_in.in_layer.weight"][1],
    )


def vae(shapes: dict[str, tuple], base: dict) -> dict:
    """The VAE's config from its original-layout shapes (encoder.down.N..., decoder.conv_in...)."""
    blocks = count_indices(shapes, r"encoder\.down\.(\d+)\.")
    widths = [shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in range(blocks)]
    return dict(
        base,
        block_out_channels=widths,
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        layers_per_block=count_indices(shapes, r"encoder\.down\.0\.block\.(\d+)\."),
        latent_channels=shapes["decoder.conv_in.weight"][1],
        in_channels=shapes["encoder.conv_in.weight"][1],
        out_channels=shapes["decoder.conv_out.weight"][0],
        use_quant_conv="quant_conv.weight" in shapes,
        use_post_quant_conv="post_quant_conv.weight" in shapes,
    )


def clip(shapes: dict[str, tuple], base: dict) -> dict:
    """CLIP-L's or CLIP-G's config from transformers-layout shapes (text_model....)."""
    vocab, width = shapes["text_model.embeddings.token_embedding.weight"]
    projection = shapes.get("text_projection.weight")
    return dict(
        base,
        vocab_size=vocab,
        hidden_size=width,
        num_attention_heads=width // HEAD_WIDTH["clip"],
        intermediate_size=shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=count_indices(shapes, r"text_model\.encoder\.layers\.(\d+)\."),
        max_position_embeddings=shapes["text_model.embeddings.position_embedding.weight"][0],
        projection_dim=projection[0] if projection else width,
    )


def t5(shapes: dict[str, tuple], base: dict) -> dict:
    """T5's encoder config from transformers-layout shapes (shared..., encoder.block.N...)."""
    attention = "encoder.block.0.layer.0.SelfAttention."
    buckets, heads = shapes[attention + "relative_attention_bias.weight"]
    inner = shapes[attention + "q.weight"][0]
    depth = count_indices(shapes, r"encoder\.block\.(\d+)\.")
    return dict(
        base,
        vocab_size=shapes["shared.weight"][0],
        d_model=shapes["shared.weight"][1],
        num_heads=heads,
        d_kv=inner // heads,
        d_ff=shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0],
        num_layers=depth,
        num_decoder_layers=depth,
        relative_attention_num_buckets=buckets,
    )


def _config(part: Source | Folder, build, template: dict, what: str) -> dict:
    """A part's config: a folder's own, else the template with the sizes its weights fix."""
    return part.config() if isinstance(part, Folder) else _read(part, build, template, what)


def _write(path: Path, config: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=1))


def _tokenizer(kind: str, spec: dict, into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    (into / "tokenizer_config.json").write_text(json.dumps(spec))
    if kind == "t5xxl":
        (into / "tokenizer.json").write_bytes(lzma.decompress((FLOW / "t5_tokenizer.json.xz").read_bytes()))
    else:
        for name in ("vocab.json", "merges.txt"):
            (into / name).write_bytes((CLIP_VOCAB / name).read_bytes())


def config_folder(family: str, transformer: Source, parts: dict[str, Source | Folder], into: Path) -> Path:
    """Write the diffusers folder (configs and tokenizers, no weights) for an SD3/Flux transformer and the `parts`
    found for it ({component: Source}), after checking the parts fit the transformer (check_fits); an SD3 without
    T5 gets none, as diffusers allows."""
    t = templates()
    config = transformer_config(family, transformer)
    schedule = "sd3" if family == "sd3" else "flux-dev" if config["guidance_embeds"] else "flux-schnell"
    configs = {}
    if "vae" in parts:
        configs["vae"] = _config(parts["vae"], vae, t["vae"][family], "VAE")
    for name, kind in PACKED_TEXT[family].items():
        if name in parts:
            what = "T5" if kind == "t5xxl" else "CLIP"
            configs[name] = _config(
                parts[name], t5 if kind == "t5xxl" else clip, t["text_encoder"][kind], what
            )
    check_fits(
        family,
        config,
        configs,
        {"transformer": transformer.path.name} | {n: p.path.name for n, p in parts.items()},
    )
    index = copy.deepcopy(t["model_index"][family])
    _write(into / "transformer", config)
    (into / "scheduler").mkdir(parents=True, exist_ok=True)
    (into / "scheduler" / "scheduler_config.json").write_text(json.dumps(t["scheduler"][schedule]))
    for name, part_config in configs.items():
        _write(into / name, part_config)
    for name, kind in PACKED_TEXT[family].items():
        tokenizer = name.replace("text_encoder", "tokenizer")
        if name in configs:
            _tokenizer(kind, t["tokenizer"][kind], into / tokenizer)
        else:
            index[name] = index[tokenizer] = [None, None]
    (into / "model_index.json").write_text(json.dumps(index, indent=1))
    return into


def check_fits(family: str, transformer: dict, parts: dict[str, dict], names: dict[str, str]) -> None:
    """The parts against the transformer, before any weight is read: the pooled CLIP width (SD3: CLIP-L's and
    CLIP-G's projections side by side; Flux: CLIP-L's), T5's width (the transformer's joint attention), the VAE's
    latent channels. A CLIP given twice, a part of another model, an SD VAE: named in one line, not a shape error
    at the first step or the decode."""
    clips = [n for n, kind in PACKED_TEXT[family].items() if kind != "t5xxl" and n in parts]
    t5 = next(n for n, kind in PACKED_TEXT[family].items() if kind == "t5xxl")
    width = "projection_dim" if family == "sd3" else "hidden_size"
    if len(clips) == len(PACKED_TEXT[family]) - 1:
        pooled = [parts[n][width] for n in clips]
        if sum(pooled) != transformer["pooled_projection_dim"]:
            given = " + ".join(f"{names[n]} {w}" for n, w in zip(clips, pooled, strict=True))
            raise ValueError(
                f"the text encoders pool {given} wide; this {family.upper()} transformer reads"
                f" {transformer['pooled_projection_dim']} (is a CLIP given twice, or one of another model?)"
            )
    if t5 in parts and parts[t5]["d_model"] != transformer["joint_attention_dim"]:
        raise ValueError(
            f"{names[t5]}: a T5 {parts[t5]['d_model']} wide; this {family.upper()} transformer reads"
            f" {transformer['joint_attention_dim']}"
        )
    if family == "flux" and is_flux_fill(transformer):
        raise ValueError(
            f"{names.get('transformer', 'the file')}: a Flux Fill/Control transformer ({transformer['in_channels']}"
            f" input channels for {transformer['out_channels']} out); gen runs Flux text-to-image files only so far"
        )
    if "vae" in parts:
        latents = parts["vae"]["latent_channels"]
        wants = transformer["in_channels"] // (4 if family == "flux" else 1)  # Flux packs 2x2 latent patches
        if latents != wants:
            raise ValueError(
                f"{names['vae']}: a VAE with {latents} latent channels; this {family.upper()} transformer reads"
                f" {wants} (an SD 1.x/SDXL VAE has 4, SD3's and Flux's 16)"
            )


def transformer_config(family: str, source: Source) -> dict:
    """The SD3/Flux transformer's diffusers config, read from the file's shapes."""
    build = sd3_transformer if family == "sd3" else flux_transformer
    return _read(source, build, templates()["transformer"][family], f"{family.upper()} transformer")


def is_flux_fill(config: dict) -> bool:
    """A Flux Fill/Control transformer: more input channels (image and mask or control latents) than out."""
    return config.get("out_channels", config["in_channels"]) != config["in_channels"]


def _read(source: Source, build, template: dict, what: str) -> dict:
    """build(shapes, template), a missing key named in one line (a file of another layout)."""
    try:
        return build(source.shapes(), template)
    except KeyError as e:
        raise ValueError(f"{source.path.name}: not the {what} layout gen reads (no {e.args[0]!r})") from None
