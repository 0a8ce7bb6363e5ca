"""`gen info`: what a model folder or single file holds, read from its files' headers without loading any weights.
For an SD3/Flux transformer file: which model it is, the parts it carries and those it still needs."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from safetensors import safe_open

from gen.loading.assets import model_folder


def _weights(folder: Path) -> dict:
    params, dtypes, size = 0, Counter(), 0
    for f in sorted(folder.glob("*.safetensors")):
        size += f.stat().st_size
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                s = st.get_slice(key)
                n = math.prod(s.get_shape())
                params += n
                dtypes[s.get_dtype()] += n
    return {"parameters": params, "bytes": size, "dtype": dtypes.most_common(1)[0][0] if dtypes else None}


def _part(source) -> dict:
    """Parameters, bytes and the main dtype of one part of a single file (its keys under `source.prefix`)."""
    from gen.pipelines.flow_parts import PACKED_PREFIXES  # here: torch stays out of `gen info` on folders

    params, dtypes, size = 0, Counter(), 0
    with safe_open(str(source.path), framework="pt") as st:
        for key in st.keys():
            if not key.startswith(source.prefix) or (source.prefix == "" and key.startswith(PACKED_PREFIXES)):
                continue
            s = st.get_slice(key)
            n = math.prod(s.get_shape())
            params += n
            dtypes[s.get_dtype()] += n
            size += n * _BYTES.get(s.get_dtype(), 4)
    return {"parameters": params, "bytes": size, "dtype": dtypes.most_common(1)[0][0] if dtypes else None}


_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1}


def _variant(family: str, config: dict) -> str:
    """The released model a transformer's config is (by its sizes), else its family and depth."""
    from gen.pipelines.flow_configs import is_flux_fill

    if family == "flux":
        if is_flux_fill(config):
            return f"Flux Fill/Control ({config['in_channels']} input channels; not run by gen yet)"
        name = "Flux.1-dev" if config["guidance_embeds"] else "Flux.1-schnell"
        return (
            name
            if (config["num_layers"], config["num_single_layers"]) == (19, 38)
            else f"Flux ({name} layout)"
        )
    known = {
        (24, 1536, None, False): "SD3 Medium",
        (24, 1536, "rms_norm", True): "SD3.5 Medium",
        (38, 2432, "rms_norm", False): "SD3.5 Large",
    }
    key = (
        config["num_layers"],
        config["caption_projection_dim"],
        config["qk_norm"],
        bool(config["dual_attention_layers"]),
    )
    return known.get(key, f"SD3 ({config['num_layers']} layers, {config['caption_projection_dim']} wide)")


def describe_flow_file(path: Path, family: str) -> dict:
    from gen.pipelines.flow_configs import transformer_config
    from gen.pipelines.flow_parts import REQUIRED, describe, packed_sources, transformer_source

    source = transformer_source(path)
    config = transformer_config(family, source)
    parts = packed_sources(path, family)
    components = {"transformer": {"class": config["_class_name"], **_part(source)}}
    for name, part in parts.items():
        components[name] = {"class": describe(name, family), **_part(part)}
    missing = [describe(n, family) for n in REQUIRED[family] if n not in parts]
    if family == "sd3" and "text_encoder_3" not in parts:
        missing.append("T5 (optional)")
    return {
        "path": str(path),
        "pipeline": f"{_variant(family, config)} single file",
        "components": components,
        "needs": missing,
    }


# an SD checkpoint's parts by version: component -> key prefix (the original layouts)
SD_PARTS = {
    "v1": {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "cond_stage_model.transformer.",
    },
    "v2": {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "cond_stage_model.model.",
    },
    "xl": {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "conditioner.embedders.0.transformer.",
        "text_encoder_2": "conditioner.embedders.1.model.",
    },
}


def describe_sd_file(path: Path) -> dict:
    """An SD 1.x/2.x/SDXL checkpoint (gen's shipped configs load it): its version and parts."""
    from gen.pipelines.flow_parts import Source
    from gen.pipelines.single_file import detect_version, unet_in_channels

    if path.suffix.lower() != ".safetensors":
        raise FileNotFoundError(f"{path}: gen info reads .safetensors files and diffusers folders")
    version = detect_version(path)
    name = {"v1": "SD 1.x", "v2": "SD 2.x", "xl": "SDXL"}[version]
    inpainting = " inpainting" if unet_in_channels(path) == 9 else ""
    components = {
        part: {"class": part, **_part(Source(path, prefix))} for part, prefix in SD_PARTS[version].items()
    }
    return {"path": str(path), "pipeline": f"{name}{inpainting} single file", "components": components}


def describe(path: str | Path | None = None) -> dict:
    folder = model_folder(path)
    if folder.is_file():
        from gen.pipelines.flow_single_file import flow_family

        try:
            family = flow_family(folder)
            return describe_flow_file(folder, family) if family else describe_sd_file(folder)
        except (ValueError, FileNotFoundError):
            raise
        except Exception:  # noqa: BLE001 -- an unreadable header (not safetensors, cut short): one line
            raise ValueError(f"{folder.name}: not a .safetensors file gen can read") from None
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{folder} has no model_index.json; expected a diffusers pipeline folder")
    index = json.loads(index_file.read_text())
    info = {"path": str(folder), "pipeline": index.get("_class_name"), "components": {}}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        entry = {"class": spec[1], "library": spec[0]}
        sub = folder / name
        if (sub / "config.json").exists():
            entry.update(_weights(sub))
        if name == "scheduler" and (sub / "scheduler_config.json").exists():
            cfg = json.loads((sub / "scheduler_config.json").read_text())
            entry.update({k: cfg.get(k) for k in ("prediction_type", "beta_schedule", "num_train_timesteps")})
        if name.startswith("tokenizer") and (sub / "vocab.json").exists():  # SDXL has tokenizer_2
            entry["vocab_size"] = len(json.loads((sub / "vocab.json").read_text()))
        info["components"][name] = entry
    size = _default_size(folder)
    if size:
        info["default_size"] = size
    return info


def _default_size(folder: Path) -> int | None:
    """Pixels per side the pipeline makes by default: the denoiser's sample size x the VAE's factor (1024 for
    SDXL, 512 for SD 1.x)."""
    try:
        vae = json.loads((folder / "vae" / "config.json").read_text())
        net = next(
            folder / n / "config.json"
            for n in ("unet", "transformer")
            if (folder / n / "config.json").is_file()
        )
        sample = json.loads(net.read_text())["sample_size"]
    except (OSError, StopIteration, KeyError, ValueError):
        return None
    return int(sample * 2 ** (len(vae.get("block_out_channels", [0])) - 1))


def format_description(info: dict) -> str:
    size = f", default size {info['default_size']}x{info['default_size']}" if info.get("default_size") else ""
    lines = [f"{info['path']}  ({info['pipeline']}{size})"]
    for name, c in info["components"].items():
        detail = [c["class"]]
        if "parameters" in c:
            detail.append(f"{c['parameters'] / 1e6:.2f} M params, {c['bytes'] / 1e6:.1f} MB, {c['dtype']}")
        for key in ("prediction_type", "beta_schedule", "vocab_size"):
            if c.get(key) is not None:
                detail.append(f"{key} {c[key]}")
        lines.append(f"  {name:<16}" + ", ".join(detail))
    if "needs" in info:
        needs = ", ".join(info["needs"]) or "nothing more"
        lines.append(f"  needs            {needs} (--text-encoder / --vae files, or --base DIR)")
    return "\n".join(lines)
