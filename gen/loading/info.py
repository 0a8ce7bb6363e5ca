"""`gen info`: what a model folder holds, read from its files' headers without loading any weights."""

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


def describe(path: str | Path | None = None) -> dict:
    folder = model_folder(path)
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
    return "\n".join(lines)
