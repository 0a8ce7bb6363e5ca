"""Loading pipelines: folders and single files, behind the pipelines' own checks; the embedded default model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

import gen.pipelines
from gen.loading.assets import DEFAULT_MODEL, model_folder  # noqa: F401  (DEFAULT_MODEL: public here too)
from gen.loading.backend import use_openvino
from gen.loading.hashing import model_hash
from gen.loading.precision import check_backend, check_precision
from gen.pipelines import TextToImagePipeline
from gen.pipelines.single_file import load_original

logger = logging.getLogger(__name__)


def load_pipeline(
    path: str | Path | None = None,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
    backend: str = "torch",
):
    """Load a local pipeline folder (gen's, SD 1.x/2.x or SDXL: one class takes both, SDXL when model_index.json
    names text_encoder_2; SD3 and Flux: their own classes, from model_index.json's _class_name) or single
    .safetensors SD checkpoint; with no path, the embedded default model.
    Never reaches the network; refuses pickle weights unless allow_pickle (see gen.pipelines.safety).
    backend="openvino": the denoiser and VAE run as OpenVINO compiled models (gen.loading.backend), in bf16 when
    torch_dtype is bfloat16, else f32; the torch modules load in float32."""
    dtype = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(torch_dtype, "fp32")
    check_precision(dtype, str(device))
    check_backend(backend, dtype, str(device))
    if backend == "openvino":
        pipe = load_pipeline(path, torch.float32, device, allow_pickle)
        use_openvino(pipe, model_hash(model_folder(path)), dtype)
        return pipe
    folder = model_folder(path)
    if folder.is_file():  # one original-layout checkpoint (SD 1.x/2.x), configs shipped with gen
        pipe = load_single_file(folder, torch_dtype=torch_dtype, allow_pickle=allow_pickle)
    else:
        cls = pipeline_class(folder)
        pipe = cls.from_pretrained(folder, allow_pickle=allow_pickle, dtype=torch_dtype)
        for suffix in ("", "_2", "_3"):  # SDXL's, SD3's and Flux's further encoders too
            if getattr(pipe, f"text_encoder{suffix}", None) is not None:
                tokenizer = getattr(pipe, f"tokenizer{suffix}")
                check_tokenizer(
                    tokenizer, getattr(pipe, f"text_encoder{suffix}"), folder, f"tokenizer{suffix}"
                )
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if torch_dtype in (torch.float16, torch.bfloat16):
        pipe.vae.to(
            torch.float32
        )  # half-precision VAEs overflow or band; the decoder is a small part of the time
    return pipe


# model_index.json's _class_name -> gen's text-to-image pipeline for that family (SD 1.x/2.x and SDXL otherwise).
FAMILIES = {
    "StableDiffusion3Pipeline": "SD3TextToImagePipeline",
    "SD3TextToImagePipeline": "SD3TextToImagePipeline",
    "FluxPipeline": "FluxTextToImagePipeline",
    "FluxTextToImagePipeline": "FluxTextToImagePipeline",
}


def pipeline_class(folder: Path):
    """gen's pipeline class for a diffusers folder, from its model_index.json (checked later by the loader)."""
    try:
        name = json.loads((folder / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):  # no index, or a broken one: the loader's checks say which
        name = None
    return getattr(gen.pipelines, FAMILIES.get(name, "TextToImagePipeline"))


def load_single_file(
    path: str | Path,
    config: str | Path | None = None,
    torch_dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
) -> TextToImagePipeline:
    """A TextToImagePipeline from one .safetensors checkpoint, offline. `config`: a diffusers folder whose configs
    fit the checkpoint (default: the shipped SD 1.x, 2.x or SDXL configs, chosen from the checkpoint's keys)."""
    return load_original(
        TextToImagePipeline, path, config, torch_dtype=torch_dtype, allow_pickle=allow_pickle
    )


def check_tokenizer(tokenizer, text_encoder, folder: Path, name: str = "tokenizer") -> None:
    """A tokenizer folder missing its vocabulary loads without error as a 2-token tokenizer; catch that here."""
    expected = text_encoder.config.vocab_size
    if len(tokenizer) < expected // 2:
        raise ValueError(
            f"{folder / name}: the tokenizer has {len(tokenizer)} tokens but the text encoder expects"
            f" {expected}; are vocab.json and merges.txt (or tokenizer.json) missing?"
        )
