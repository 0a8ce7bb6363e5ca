"""Checks on a model folder before and after loading it: no code runs from a weights file, and every broken
folder gets a one-line error naming the file, instead of a traceback from deep inside a library.

- Weights must be safetensors. Pickle formats (.bin, .ckpt, .pt, .pth) can run code when loaded; they are
  refused unless allow_pickle=True, and then read with torch.load(weights_only=True) by diffusers/transformers.
- model_index.json may name classes from diffusers, transformers and gen only: nothing else is imported.
- git-lfs pointer files, truncated or corrupt safetensors, empty folders, lone component folders and folders of
  other pipeline types are recognised by what they are.
- After loading, every parameter must be finite.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

PICKLE = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
LIBRARIES = ("diffusers", "transformers", "gen.models.dit")
PIPELINES = (
    "TextToImagePipeline",
    "ImageToImagePipeline",
    "InpaintPipeline",
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
    "ControlNetPipeline",  # gen.pipelines.ControlNetPipeline.from_pretrained
    "StableDiffusionControlNetPipeline",
    "StableDiffusionXLControlNetPipeline",
    "SD3TextToImagePipeline",
    "StableDiffusion3Pipeline",
    "FluxTextToImagePipeline",
    "FluxPipeline",
)
LFS_MAGIC = b"version https://git-lfs"


def check_weight_file(path: Path) -> None:
    """A .safetensors file that is whole: not an LFS pointer, header and data sizes consistent."""
    from safetensors import safe_open

    with path.open("rb") as f:
        head = f.read(64)
    if head.startswith(LFS_MAGIC):
        raise ValueError(
            f"{path} is a git-lfs pointer, not the weights; run `git lfs pull` in that repository"
        )
    if len(head) < 8:
        raise ValueError(f"{path} is empty or truncated ({path.stat().st_size} bytes)")
    header_len = int.from_bytes(head[:8], "little")
    size = path.stat().st_size
    if header_len <= 0 or 8 + header_len > size:
        raise ValueError(
            f"{path} is truncated or not a safetensors file (header claims {header_len} bytes, file has {size})"
        )
    try:
        with safe_open(str(path), framework="pt") as st:
            end = 0
            for key in st.keys():
                piece = st.get_slice(key)
                end += math.prod(piece.get_shape()) * _itemsize(piece.get_dtype())
    except Exception as e:  # safetensors raises its own error types for malformed headers
        detail = str(e).splitlines()[0]
        state = "truncated" if "not fully covered" in detail else "corrupt"
        raise ValueError(f"{path} is {state}: {detail}") from None
    if 8 + header_len + end > size:
        raise ValueError(
            f"{path} is truncated: its tensors need {8 + header_len + end} bytes, the file has {size}"
        )


def _itemsize(dtype: str) -> int:
    return {
        "F64": 8,
        "I64": 8,
        "U64": 8,
        "F32": 4,
        "I32": 4,
        "U32": 4,
        "F16": 2,
        "BF16": 2,
        "I16": 2,
        "U16": 2,
        "I8": 1,
        "U8": 1,
        "BOOL": 1,
        "F8_E4M3": 1,
        "F8_E5M2": 1,
    }.get(dtype, 1)


def check_folder(folder: Path, allow_pickle: bool = False) -> dict:
    """Pre-flight for a pipeline folder; returns its model_index. ValueError/FileNotFoundError otherwise."""
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist; give a local pipeline folder")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        if (folder / "config.json").is_file():
            cls = json.loads((folder / "config.json").read_text()).get("_class_name", "a single model")
            raise ValueError(
                f"{folder} holds one component ({cls}), not a pipeline; pass the folder above it"
            )
        what = "is empty" if not any(folder.iterdir()) else "has no model_index.json"
        raise FileNotFoundError(
            f"{folder} {what}; expected a diffusers pipeline folder (model_index.json, text_encoder/, tokenizer/,"
            " vae/, scheduler/, transformer/ or unet/)"
        )
    try:
        index = json.loads(index_file.read_text())
    except ValueError as e:
        raise ValueError(f"{index_file} is not valid JSON ({e})") from None
    kind = index.get("_class_name")
    if kind not in PIPELINES:
        raise ValueError(
            f"{folder} is a {kind} folder; gen loads {', '.join(PIPELINES)} folders (SD 1.x/2.x, SDXL, SD3 and Flux layouts)"
        )
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        if name in ("safety_checker", "feature_extractor", "image_encoder"):
            continue  # named by SD folders, never loaded by gen
        if spec[0] not in LIBRARIES:
            raise ValueError(
                f"{index_file}: component {name!r} names module {spec[0]!r}; gen imports classes only from"
                f" {', '.join(LIBRARIES)} (no code from model folders)"
            )
        _check_component(folder / name, allow_pickle)
    return index


def _check_component(sub: Path, allow_pickle: bool) -> None:
    if not sub.is_dir():
        return  # diffusers names the missing folder itself
    weights = sorted(p for p in sub.iterdir() if p.suffix == ".safetensors")
    pickles = sorted(p for p in sub.iterdir() if p.suffix in PICKLE)
    for path in weights:
        check_weight_file(path)
    if pickles and not weights and not allow_pickle:
        raise ValueError(
            f"{pickles[0]} is a pickle file, which can run code when loaded; convert it to .safetensors or pass"
            " --allow-pickle / allow_pickle=True (then read with torch.load(weights_only=True))"
        )


def check_finite(pipe, folder: Path) -> None:
    """Every loaded parameter finite; the first bad tensor is named."""
    for name in ("transformer", "unet", "vae", "text_encoder"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        for key, value in module.state_dict().items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(
                    f"{folder / name}: tensor {key!r} contains NaN or Inf values; the weights are damaged"
                )
