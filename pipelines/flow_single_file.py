"""SD3 and Flux transformers as single files (the layouts ComfyUI, Forge and civitai users download: Stability's
MMDiT keys `joint_blocks.*`, Black Forest Labs' `double_blocks.*` / `single_blocks.*`, with or without the
`model.diffusion_model.` prefix), loaded offline into a pipeline whose other parts come from separate part files
(gen.pipelines.flow_parts), from the file itself, or from a diffusers folder of the same model; with no folder,
gen's shipped configs and tokenizers stand in for one (gen.pipelines.flow_configs).

Loading goes through diffusers' own converters (`from_single_file` with the folder's transformer config, so nothing
is fetched). Those converters read the SD3 architecture from the file's shapes, but Flux's hard-code Flux.1's width
(3072): a Flux file converts as diffusers converts it, and only real Flux.1 files do. The folder's config must fit
the file: a Flux-dev file (guidance embedding) with a schnell folder, or a different depth, is named in one line
before conversion.

A file may carry more than the transformer (Stability's `sd3_medium_incl_clips*.safetensors`, ComfyUI's all-in-one
checkpoints): the VAE (`first_stage_model.` or `vae.`) and text encoders (`text_encoders.clip_l.`, `clip_g.`,
`t5xxl.`) it holds are loaded from it by diffusers' per-part converters, each from its own keys alone, and the
folder then gives only what the file lacks, the tokenizers and the configs.

The way back (diffusers -> Stability's and BFL's keys) is gen.pipelines.flow_export.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from gen.pipelines.flow_parts import (
    PACKED_PREFIXES,
    PACKED_TEXT,
    PREFIX,
    TEXT_PREFIX,
    VAE_PREFIXES,
    Folder,
    Source,
    count_indices,
    dequantize_scaled_fp8,
    packed_sources,
)

logger = logging.getLogger(__name__)

SD3_KEY = "joint_blocks.0.x_block.attn.qkv.weight"
FLUX_KEY = "double_blocks.0.img_attn.qkv.weight"


def _keys(path: Path) -> list[str]:
    """The transformer's keys (the `model.diffusion_model.` prefix dropped), without a packed VAE's or encoder's."""
    with safe_open(str(path), framework="pt") as f:
        return [k.removeprefix(PREFIX) for k in f.keys() if not k.startswith(PACKED_PREFIXES)]


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


def check_fit(path: Path, family: str, config: dict) -> None:
    """The file's depth (and Flux's guidance embedding) against the folder's transformer config."""
    keys = _keys(path)
    if family == "sd3":
        found = {"num_layers": count_indices(keys, r"joint_blocks\.(\d+)\.")}
    else:
        found = {
            "num_layers": count_indices(keys, r"double_blocks\.(\d+)\."),
            "num_single_layers": count_indices(keys, r"single_blocks\.(\d+)\."),
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


def load_transformer(
    path: str | Path, folder: str | Path, family: str, torch_dtype=torch.float32, configs: str = ""
):
    """The file's transformer, converted by diffusers with `folder`'s transformer config, offline; `configs` names
    where the config came from in errors (default: the folder)."""
    cls = transformer_class(family)
    config = cls.load_config(str(folder), subfolder="transformer")
    check_fit(Path(path), family, config)
    try:
        return cls.from_single_file(
            dequantize_scaled_fp8(
                _tensors(Path(path), lambda k: not k.startswith(PACKED_PREFIXES)), torch_dtype
            ),
            config=str(folder),
            subfolder="transformer",
            local_files_only=True,
            torch_dtype=torch_dtype,
        )
    except (ValueError, RuntimeError, KeyError, AssertionError) as e:
        detail = " ".join(str(e).split())[:300] or type(e).__name__
        where = configs or f"{folder}'s"
        raise ValueError(
            f"{Path(path).name}: diffusers could not convert it with {where} config: {detail}"
        ) from None


def packed_parts(path: str | Path, family: str) -> list[str]:
    """The pipeline components besides the transformer that the file carries ("vae", "text_encoder", ...)."""
    return list(packed_sources(path, family))


def load_packed(path: str | Path, folder: str | Path, family: str, torch_dtype=torch.float32) -> dict:
    """The VAE and text encoders the file carries, each converted by diffusers from its own keys with `folder`'s
    config for it (so CLIP-L and CLIP-G cannot be taken for each other, whatever their widths), offline."""
    return load_parts(packed_sources(path, family), folder, family, torch_dtype)


def load_parts(
    sources: dict[str, Source], folder: str | Path, family: str, torch_dtype=torch.float32
) -> dict:
    """The VAE and text encoders `sources` point at ({component: Source}, packed in the transformer's file or in
    separate files), each renamed to the all-in-one layout and converted by diffusers' per-part converter with
    `folder`'s config for that component, offline."""
    from diffusers.loaders.single_file_utils import (
        create_diffusers_clip_model_from_ldm,
        create_diffusers_t5_model_from_checkpoint,
    )

    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    out = {}
    for name, source in sources.items():
        path = source.path
        library, class_name = index.get(name) or (None, None)
        if class_name is None:
            raise ValueError(f"{path.name} carries a {name} the folder {folder} has no place for")
        cls = getattr(importlib.import_module(library), class_name)
        if isinstance(source, Folder):
            out[name] = _from_folder(cls, library, source.path, name, torch_dtype)
            continue
        part = PACKED_TEXT[family].get(name)
        sd = source.tensors(VAE_PREFIXES[0] if part is None else TEXT_PREFIX.format(part), torch_dtype)
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
                _shared_embedding(sd, TEXT_PREFIX.format(part))
                out[name] = create_diffusers_t5_model_from_checkpoint(cls, sd, **common)
            else:
                out[name] = create_diffusers_clip_model_from_ldm(cls, sd, **common)
        except (ValueError, RuntimeError, KeyError, AssertionError, OSError) as e:
            detail = " ".join(str(e).split())[:300] or type(e).__name__
            raise ValueError(f"{path.name}: diffusers could not convert its {name}: {detail}") from None
        if part == "t5xxl":
            # ComfyUI's and Stability's T5 holds the embedding once (`shared.weight`); transformers' T5 also has
            # encoder.embed_tokens, tied to it, which loading by key leaves on the meta device
            out[name].tie_weights()
        _check_loaded(out[name], path, name)
        # diffusers' T5 converter leaves the model training (dropout on); from_pretrained would not
        out[name].eval()
        logger.info("%s: %s from the file", path.name, name)
    return out


def _from_folder(cls, library: str, path: Path, name: str, torch_dtype):
    """A part from its own folder, by its library's from_pretrained; weights the pipeline's class needs and the
    folder lacks (a CLIP without the projection SD3 reads) are refused, not left random."""
    dtype = {"dtype": torch_dtype} if library == "transformers" else {"torch_dtype": torch_dtype}
    try:
        model, info = cls.from_pretrained(path, **dtype, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        detail = " ".join(str(e).split())[:300] or type(e).__name__
        raise ValueError(f"{path}: could not load it as the {name} ({cls.__name__}): {detail}") from None
    if info.get("missing_keys"):
        raise ValueError(
            f"{path}: the {name} ({cls.__name__}) needs weights the folder lacks, e.g. {sorted(info['missing_keys'])[0]!r}"
        )
    logger.info("%s: %s from the folder", path, name)
    return model.eval()


def _shared_embedding(sd: dict, prefix: str) -> None:
    """A T5 file holding its embedding only as encoder.embed_tokens (some exports do) gets it as `shared` too,
    the name transformers ties the encoder's to."""
    if prefix + "shared.weight" not in sd and prefix + "encoder.embed_tokens.weight" in sd:
        sd[prefix + "shared.weight"] = sd[prefix + "encoder.embed_tokens.weight"]


def _check_loaded(module: torch.nn.Module, path: Path, name: str) -> None:
    """A converter that skipped a weight leaves it on the meta device (or unset): name it, not a later crash."""
    empty = [k for k, v in module.state_dict().items() if v.is_meta]
    if empty:
        raise ValueError(f"{path.name}: its {name} lacks weights the folder's config has, e.g. {empty[0]!r}")
