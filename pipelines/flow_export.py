"""SD3 and Flux transformers written back in the layouts single files use: Stability's MMDiT keys and Black Forest
Labs' keys, each under `model.diffusion_model.` (the inverses of diffusers' convert_sd3_transformer_checkpoint_to_
diffusers and convert_flux_transformer_checkpoint_to_diffusers).

Written here because diffusers has no such writers; the tests check each by a round trip through diffusers' own
converter (gen.pipelines.flow_single_file loads with it). Flux's converter splits a single block's fused
q/k/v/MLP projection at Flux.1's width (3072), so only a Flux.1-wide transformer round-trips.
"""

from __future__ import annotations

import torch

from gen.pipelines.flow_single_file import PREFIX

FLUX1_WIDTH = 3072  # diffusers' Flux converter splits a single block's fused projection at this width


def export_sd3(transformer) -> dict[str, torch.Tensor]:
    """A diffusers SD3Transformer2DModel's weights under Stability's MMDiT keys (with `model.diffusion_model.`),
    the inverse of diffusers' convert_sd3_transformer_checkpoint_to_diffusers."""
    sd = {k: v.detach() for k, v in transformer.state_dict().items()}
    out: dict[str, torch.Tensor] = {
        "pos_embed": sd.pop("pos_embed.pos_embed"),
        "x_embedder.proj.weight": sd.pop("pos_embed.proj.weight"),
        "x_embedder.proj.bias": sd.pop("pos_embed.proj.bias"),
        "context_embedder.weight": sd.pop("context_embedder.weight"),
        "context_embedder.bias": sd.pop("context_embedder.bias"),
        **_final_layer(sd),
    }
    for theirs, ours in (("t_embedder", "time_text_embed.timestep_embedder"), ("y_embedder", "time_text_embed.text_embedder")):  # fmt: skip
        for a, b in (("mlp.0", "linear_1"), ("mlp.2", "linear_2")):
            for p in ("weight", "bias"):
                out[f"{theirs}.{a}.{p}"] = sd.pop(f"{ours}.{b}.{p}")
    layers = transformer.config.num_layers
    for i in range(layers):
        out |= _sd3_block(sd, i, last=i == layers - 1)
    if sd:
        raise ValueError(f"export_sd3 does not know these weights: {sorted(sd)[:5]}")
    return {PREFIX + k: v.contiguous() for k, v in out.items()}


def _sd3_block(sd: dict, i: int, last: bool) -> dict:
    d, o = f"transformer_blocks.{i}", f"joint_blocks.{i}"
    out = {}
    for p in ("weight", "bias"):
        out[f"{o}.x_block.attn.qkv.{p}"] = torch.cat([sd.pop(f"{d}.attn.to_{x}.{p}") for x in "qkv"])
        out[f"{o}.context_block.attn.qkv.{p}"] = torch.cat(
            [sd.pop(f"{d}.attn.add_{x}_proj.{p}") for x in "qkv"]
        )
        out[f"{o}.x_block.attn.proj.{p}"] = sd.pop(f"{d}.attn.to_out.0.{p}")
        out[f"{o}.x_block.adaLN_modulation.1.{p}"] = sd.pop(f"{d}.norm1.linear.{p}")
        context_norm = sd.pop(f"{d}.norm1_context.linear.{p}")
        out[f"{o}.context_block.adaLN_modulation.1.{p}"] = _swap(context_norm) if last else context_norm
        out[f"{o}.x_block.mlp.fc1.{p}"] = sd.pop(f"{d}.ff.net.0.proj.{p}")
        out[f"{o}.x_block.mlp.fc2.{p}"] = sd.pop(f"{d}.ff.net.2.{p}")
        if not last:
            out[f"{o}.context_block.attn.proj.{p}"] = sd.pop(f"{d}.attn.to_add_out.{p}")
            out[f"{o}.context_block.mlp.fc1.{p}"] = sd.pop(f"{d}.ff_context.net.0.proj.{p}")
            out[f"{o}.context_block.mlp.fc2.{p}"] = sd.pop(f"{d}.ff_context.net.2.{p}")
        if f"{d}.attn2.to_q.{p}" in sd:  # SD3.5 Medium's second attention (MMDiT-X)
            out[f"{o}.x_block.attn2.qkv.{p}"] = torch.cat([sd.pop(f"{d}.attn2.to_{x}.{p}") for x in "qkv"])
            out[f"{o}.x_block.attn2.proj.{p}"] = sd.pop(f"{d}.attn2.to_out.0.{p}")
    for ours, theirs in (("attn.norm_q", "x_block.attn.ln_q"), ("attn.norm_k", "x_block.attn.ln_k"),
                         ("attn.norm_added_q", "context_block.attn.ln_q"), ("attn.norm_added_k", "context_block.attn.ln_k"),
                         ("attn2.norm_q", "x_block.attn2.ln_q"), ("attn2.norm_k", "x_block.attn2.ln_k")):  # fmt: skip
        if f"{d}.{ours}.weight" in sd:  # SD3.5's qk norm
            out[f"{o}.{theirs}.weight"] = sd.pop(f"{d}.{ours}.weight")
    return out


def _final_layer(sd: dict) -> dict:
    """The output projection and its norm's modulation, as both layouts name them (the halves swapped)."""
    out = {f"final_layer.linear.{p}": sd.pop(f"proj_out.{p}") for p in ("weight", "bias")}
    for p in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{p}"] = _swap(sd.pop(f"norm_out.linear.{p}"))
    return out


def _swap(weight: torch.Tensor) -> torch.Tensor:
    """(scale, shift) <-> (shift, scale): the final norms' halves are ordered oppositely in the two layouts."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def export_flux(transformer) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel's weights under Black Forest Labs' keys (with `model.diffusion_model.`).
    Only Flux.1's width: other widths would make files no converter reads back."""
    c = transformer.config
    if c.num_attention_heads * c.attention_head_dim != FLUX1_WIDTH:
        raise ValueError(
            f"export_flux writes Flux.1's width ({FLUX1_WIDTH}); this transformer is"
            f" {c.num_attention_heads * c.attention_head_dim} wide"
        )
    sd = {k: v.detach() for k, v in transformer.state_dict().items()}
    out: dict[str, torch.Tensor] = {
        "txt_in.weight": sd.pop("context_embedder.weight"),
        "txt_in.bias": sd.pop("context_embedder.bias"),
        "img_in.weight": sd.pop("x_embedder.weight"),
        "img_in.bias": sd.pop("x_embedder.bias"),
        **_final_layer(sd),
    }
    embedders = {
        "time_in": "timestep_embedder",
        "vector_in": "text_embedder",
        "guidance_in": "guidance_embedder",
    }
    for theirs, ours in embedders.items():
        for a, b in (("in_layer", "linear_1"), ("out_layer", "linear_2")):
            for p in ("weight", "bias"):
                key = f"time_text_embed.{ours}.{b}.{p}"
                if key in sd:  # schnell has no guidance embedder
                    out[f"{theirs}.{a}.{p}"] = sd.pop(key)
    for i in range(transformer.config.num_layers):
        out |= _flux_double(sd, i)
    for i in range(transformer.config.num_single_layers):
        out |= _flux_single(sd, i)
    if sd:
        raise ValueError(f"export_flux does not know these weights: {sorted(sd)[:5]}")
    return {PREFIX + k: v.contiguous() for k, v in out.items()}


def _flux_double(sd: dict, i: int) -> dict:
    d, o = f"transformer_blocks.{i}", f"double_blocks.{i}"
    out = {}
    for side, attn, ff, norm, add in (("img", "to_", "ff", "norm1", ""), ("txt", "add_", "ff_context", "norm1_context", "add_")):  # fmt: skip
        names = [f"{d}.attn.{attn}{x}" + ("_proj" if add else "") for x in "qkv"]
        for p in ("weight", "bias"):
            out[f"{o}.{side}_attn.qkv.{p}"] = torch.cat([sd.pop(f"{n}.{p}") for n in names])
            out[f"{o}.{side}_mod.lin.{p}"] = sd.pop(f"{d}.{norm}.linear.{p}")
            out[f"{o}.{side}_mlp.0.{p}"] = sd.pop(f"{d}.{ff}.net.0.proj.{p}")
            out[f"{o}.{side}_mlp.2.{p}"] = sd.pop(f"{d}.{ff}.net.2.{p}")
            out[f"{o}.{side}_attn.proj.{p}"] = sd.pop(f"{d}.attn.{'to_add_out' if add else 'to_out.0'}.{p}")
        q, k = ("norm_added_q", "norm_added_k") if add else ("norm_q", "norm_k")
        out[f"{o}.{side}_attn.norm.query_norm.scale"] = sd.pop(f"{d}.attn.{q}.weight")
        out[f"{o}.{side}_attn.norm.key_norm.scale"] = sd.pop(f"{d}.attn.{k}.weight")
    return out


def _flux_single(sd: dict, i: int) -> dict:
    d, o = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
    out = {}
    for p in ("weight", "bias"):
        fused = [sd.pop(f"{d}.attn.to_{x}.{p}") for x in "qkv"] + [sd.pop(f"{d}.proj_mlp.{p}")]
        out[f"{o}.linear1.{p}"] = torch.cat(fused)
        out[f"{o}.linear2.{p}"] = sd.pop(f"{d}.proj_out.{p}")
        out[f"{o}.modulation.lin.{p}"] = sd.pop(f"{d}.norm.linear.{p}")
    out[f"{o}.norm.query_norm.scale"] = sd.pop(f"{d}.attn.norm_q.weight")
    out[f"{o}.norm.key_norm.scale"] = sd.pop(f"{d}.attn.norm_k.weight")
    return out
