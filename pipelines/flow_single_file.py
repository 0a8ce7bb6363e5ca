"""SD3 and Flux transformers as single files (the layouts ComfyUI, Forge and civitai users download: Stability's
MMDiT keys `joint_blocks.*`, Black Forest Labs' `double_blocks.*` / `single_blocks.*`, with or without the
`model.diffusion_model.` prefix), loaded offline into a pipeline whose other parts come from a diffusers folder
of the same model, and SD3's export back to that layout.

Loading goes through diffusers' own converters (`from_single_file` with the folder's transformer config, so nothing
is fetched). A file may carry more than the transformer (Stability's `sd3_medium_incl_clips*.safetensors`, ComfyUI's
all-in-one checkpoints): the VAE (`first_stage_model.` or `vae.`) and the text encoders (`text_encoders.clip_l.`,
`clip_g.`, `t5xxl.`) it holds are loaded from it by diffusers' per-part converters, each from its own keys alone,
and the folder gives only what the file lacks, the tokenizers and the configs. Those converters read the SD3 architecture from the file's shapes, but Flux's hard-code Flux.1's width
(3072): a Flux file converts as diffusers converts it, and only real Flux.1 files do. The folder's config must fit
the file: a Flux-dev file (guidance embedding) with a schnell folder, or a different depth, is named in one line
before conversion. T5 has no tokenizer a user could carry in a single file, which is why the folder is required.

Exporting (diffusers SD3 transformer -> Stability's keys) is written here because diffusers has no such writer; the
tests check it by a round trip through diffusers' converter.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

PREFIX = "model.diffusion_model."
SD3_KEY = "joint_blocks.0.x_block.attn.qkv.weight"
FLUX_KEY = "double_blocks.0.img_attn.qkv.weight"


VAE_PREFIXES = ("first_stage_model.", "vae.")  # diffusers' LDM_VAE_KEYS
TEXT_PREFIX = "text_encoders.{}.transformer."
# the text encoders an all-in-one file may pack, as the pipeline names them, per family
PACKED_TEXT = {
    "sd3": {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5xxl"},
    "flux": {"text_encoder": "clip_l", "text_encoder_2": "t5xxl"},
}
_PACKED = (*VAE_PREFIXES, "text_encoders.")  # keys of parts other than the transformer


def _keys(path: Path) -> list[str]:
    """The transformer's keys (the `model.diffusion_model.` prefix dropped), without a packed VAE's or encoder's."""
    with safe_open(str(path), framework="pt") as f:
        return [k.removeprefix(PREFIX) for k in f.keys() if not k.startswith(_PACKED)]


def flow_family(path: str | Path) -> str | None:
    """ "sd3" or "flux" for a single file holding such a transformer, None for anything else."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return None
    try:
        keys = set(_keys(path))
    except Exception:  # noqa: BLE001 -- not readable as safetensors: the SD loader's checks name the problem
        return None
    return "sd3" if SD3_KEY in keys else "flux" if FLUX_KEY in keys else None


def _depth(keys: list[str], block: str) -> int:
    numbers = {int(m.group(1)) for k in keys if (m := re.match(rf"{block}\.(\d+)\.", k))}
    return max(numbers) + 1 if numbers else 0


def check_fit(path: Path, family: str, config: dict) -> None:
    """The file's depth (and Flux's guidance embedding) against the folder's transformer config."""
    keys = _keys(path)
    if family == "sd3":
        found = {"num_layers": _depth(keys, "joint_blocks")}
    else:
        found = {
            "num_layers": _depth(keys, "double_blocks"),
            "num_single_layers": _depth(keys, "single_blocks"),
            "guidance_embeds": any(k.startswith("guidance_in.") for k in keys),
        }
    for name, value in found.items():
        if config.get(name) != value:
            kind = {True: "Flux-dev (guidance embedding)", False: "Flux-schnell (none)"}
            said = kind.get(value, value) if name == "guidance_embeds" else value
            want = (
                kind.get(config.get(name), config.get(name))
                if name == "guidance_embeds"
                else config.get(name)
            )
            raise ValueError(
                f"{path.name} does not fit the folder's transformer: {name} is {said} in the file and {want} in"
                " the folder's config; give the folder of the model the file was made from"
            )


def transformer_class(family: str) -> type:
    """diffusers' transformer class of a family ("sd3" or "flux")."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    return SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel


def _tensors(path: Path, keep) -> dict[str, torch.Tensor]:
    """The file's tensors whose keys `keep` accepts, read alone (an all-in-one file is not held whole)."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if keep(k)}


def load_transformer(path: str | Path, folder: str | Path, family: str, torch_dtype=torch.float32):
    """The file's transformer, converted by diffusers with `folder`'s transformer config, offline."""
    cls = transformer_class(family)
    config = cls.load_config(str(folder), subfolder="transformer")
    check_fit(Path(path), family, config)
    try:
        return cls.from_single_file(
            _tensors(Path(path), lambda k: not k.startswith(_PACKED)),
            config=str(folder),
            subfolder="transformer",
            local_files_only=True,
            torch_dtype=torch_dtype,
        )
    except (ValueError, RuntimeError, KeyError, AssertionError) as e:
        detail = " ".join(str(e).split())[:300] or type(e).__name__
        raise ValueError(
            f"{Path(path).name}: diffusers could not convert it with {folder}'s config: {detail}"
        ) from None


def packed_parts(path: str | Path, family: str) -> list[str]:
    """The pipeline components besides the transformer that the file carries ("vae", "text_encoder", ...)."""
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    found = ["vae"] if any(k.startswith(VAE_PREFIXES) for k in keys) else []
    for name, part in PACKED_TEXT[family].items():
        if any(k.startswith(TEXT_PREFIX.format(part)) for k in keys):
            found.append(name)
    return found


def load_packed(path: str | Path, folder: str | Path, family: str, torch_dtype=torch.float32) -> dict:
    """The VAE and text encoders the file carries, each converted by diffusers from its own keys with `folder`'s
    config for it (so CLIP-L and CLIP-G cannot be taken for each other, whatever their widths), offline."""
    from diffusers.loaders.single_file_utils import (
        create_diffusers_clip_model_from_ldm,
        create_diffusers_t5_model_from_checkpoint,
    )

    path, folder = Path(path), Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    out = {}
    for name in packed_parts(path, family):
        library, class_name = index.get(name) or (None, None)
        if class_name is None:
            raise ValueError(f"{path.name} carries a {name} the folder {folder} has no place for")
        cls = getattr(importlib.import_module(library), class_name)
        part = PACKED_TEXT[family].get(name)
        prefixes = VAE_PREFIXES if part is None else (TEXT_PREFIX.format(part),)
        sd = _tensors(path, lambda k, p=prefixes: k.startswith(p))
        common = {
            "config": str(folder),
            "subfolder": name,
            "torch_dtype": torch_dtype,
            "local_files_only": True,
        }
        try:
            if part is None:
                out[name] = cls.from_single_file(sd, **common)
            elif part == "t5xxl":
                out[name] = create_diffusers_t5_model_from_checkpoint(cls, sd, **common)
            else:
                out[name] = create_diffusers_clip_model_from_ldm(cls, sd, **common)
        except (ValueError, RuntimeError, KeyError, AssertionError, OSError) as e:
            detail = " ".join(str(e).split())[:300] or type(e).__name__
            raise ValueError(f"{path.name}: diffusers could not convert its {name}: {detail}") from None
        _check_loaded(out[name], path, name)
        out[
            name
        ].eval()  # diffusers' T5 converter leaves the model training (dropout on); from_pretrained does not
        logger.info("%s: %s from the file", path.name, name)
    return out


def _check_loaded(module: torch.nn.Module, path: Path, name: str) -> None:
    """A converter that skipped a weight leaves it on the meta device (or unset): name it, not a later crash."""
    empty = [k for k, v in module.state_dict().items() if v.is_meta]
    if empty:
        raise ValueError(f"{path.name}: its {name} lacks weights the folder's config has, e.g. {empty[0]!r}")


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
        "final_layer.linear.weight": sd.pop("proj_out.weight"),
        "final_layer.linear.bias": sd.pop("proj_out.bias"),
        "final_layer.adaLN_modulation.1.weight": _swap(sd.pop("norm_out.linear.weight")),
        "final_layer.adaLN_modulation.1.bias": _swap(sd.pop("norm_out.linear.bias")),
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


def _swap(weight: torch.Tensor) -> torch.Tensor:
    """(scale, shift) <-> (shift, scale): the final norms' halves are ordered oppositely in the two layouts."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)
