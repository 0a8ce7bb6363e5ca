"""Loading pipelines: folders and single files, behind the pipelines' own checks; the embedded default model."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch

import gen.pipelines
from gen.loading.assets import DEFAULT_MODEL, model_folder  # noqa: F401  (DEFAULT_MODEL: public here too)
from gen.loading.backend import use_openvino
from gen.loading.hashing import model_hash
from gen.loading.precision import check_backend, check_precision
from gen.pipelines import TextToImagePipeline
from gen.pipelines.flow_configs import config_folder
from gen.pipelines.flow_parts import (
    REQUIRED,
    describe,
    file_sources,
    identify,
    packed_sources,
    transformer_source,
)
from gen.pipelines.flow_single_file import (
    check_fit,
    flow_family,
    load_parts,
    load_transformer,
    transformer_class,
)
from gen.pipelines.safety import check_weight_file
from gen.pipelines.single_file import load_original

logger = logging.getLogger(__name__)


def load_pipeline(
    path: str | Path | None = None,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
    backend: str = "torch",
    base: str | Path | None = None,
    text_encoders: list[str | Path] = (),
    vae: str | Path | None = None,
):
    """Load a local pipeline folder (gen's, SD 1.x/2.x or SDXL: one class takes both, SDXL when model_index.json
    names text_encoder_2; SD3 and Flux: their own classes, from model_index.json's _class_name) or single
    .safetensors SD checkpoint (configs shipped with gen, or `base`'s), or an SD3/Flux transformer file whose other
    parts come from the files `text_encoders` and `vae`, the file itself or the diffusers folder `base` (see
    load_flow_file); with no path, the embedded default model.
    Never reaches the network; refuses pickle weights unless allow_pickle (see gen.pipelines.safety).
    backend="openvino": the denoiser, VAE and CLIP text encoders run as OpenVINO compiled models
    (gen.loading.backend), in bf16 when torch_dtype is bfloat16, else f32; the torch modules load in float32 and
    their converted weights are released (loaded again the first time a call needs torch)."""
    dtype = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(torch_dtype, "fp32")
    check_precision(dtype, str(device))
    check_backend(backend, dtype, str(device))
    if backend == "openvino":
        parts = {"base": base, "text_encoders": text_encoders, "vae": vae}
        pipe = load_pipeline(path, torch.float32, device, allow_pickle, **parts)

        def reload():
            return load_pipeline(path, torch.float32, device, allow_pickle, **parts)

        use_openvino(pipe, model_hash(model_folder(path)), dtype, reload=reload)
        return pipe
    folder = model_folder(path)
    family = flow_family(folder) if folder.is_file() else None
    if (text_encoders or vae) and family is None:
        raise ValueError(
            f"{folder.name}: --text-encoder and --vae are for SD3/Flux transformer files; this model carries its own"
        )
    if family is not None:  # an SD3/Flux transformer file; the rest from part files, itself or `base`
        pipe = load_flow_file(folder, base, family, torch_dtype, allow_pickle, text_encoders, vae)
    elif folder.is_file():  # one original-layout checkpoint (SD 1.x/2.x/SDXL); configs shipped or from `base`
        pipe = load_single_file(folder, base, torch_dtype=torch_dtype, allow_pickle=allow_pickle)
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


def base_class(base: Path):
    """gen's pipeline class for a `--base` folder; FileNotFoundError in one line if it is not a pipeline folder."""
    if not base.is_dir() or not (base / "model_index.json").is_file():
        raise FileNotFoundError(f"--base {base}: not a diffusers pipeline folder (no model_index.json)")
    return pipeline_class(base)


def flow_file(path: str | Path | None) -> str | None:
    """ "sd3" or "flux" if `path` is such a transformer single file (what part files and --base are for), else None."""
    folder = model_folder(path) if path is not None else None
    return flow_family(folder) if folder is not None and folder.is_file() else None


def base_for(path: str | Path | None, bases: list[str]) -> str | None:
    """For a server given several models and `--base` folders: the first folder in `bases` that fits the SD3/Flux
    transformer file `path` (its family, depth and Flux's guidance embedding); None for every other model (a
    folder, an SD checkpoint: those need no base) and for a file no folder of its family was given for (gen's
    shipped configs then stand in). ValueError in one line when folders of its family are given and none fits."""
    folder = model_folder(path) if path is not None else None
    family = flow_family(folder) if folder is not None and folder.is_file() else None
    if family is None:
        return None
    name = {"sd3": "SD3", "flux": "Flux"}[family]
    misfits = []
    for base in bases:
        base_path = Path(base)
        if not base_class(base_path).__name__.lower().startswith(family):
            continue
        try:
            check_fit(
                folder, family, transformer_class(family).load_config(str(base_path), subfolder="transformer")
            )
        except (ValueError, OSError) as e:  # a misfit, or a folder with no transformer config
            misfits.append(" ".join(str(e).split()))
            continue
        return str(base_path)
    if not misfits:
        return None
    raise ValueError(
        f"{folder.name} is an {name} transformer file and no --base folder fits it ({misfits[0]}); give the"
        f" diffusers {name} folder of the model it was made from, or none (gen's shipped configs)"
    )


def load_flow_file(
    path: Path,
    base,
    family: str,
    torch_dtype: torch.dtype,
    allow_pickle: bool = False,
    text_encoders: list[str | Path] = (),
    vae: str | Path | None = None,
):
    """An SD3 or Flux pipeline: the transformer from the single file `path`; the VAE and text encoders from the
    separate files given (their kind read from their keys), else the ones the file carries (all-in-one files),
    else the diffusers folder `base` of the same family. With no `base`, gen's shipped configs and tokenizers
    stand in for it (gen.pipelines.flow_configs), and every part the model needs must come from a file."""
    name = {"sd3": "SD3", "flux": "Flux"}[family]
    check_weight_file(path)
    sources = part_sources(path, family, text_encoders, vae)
    if base is None:
        missing = [describe(n, family) for n in REQUIRED[family] if n not in sources]
        if missing:
            raise ValueError(
                f"{path.name} is an {name} transformer file without {', '.join(missing)}; give the part files"
                " (--text-encoder FILE for CLIP and T5, --vae FILE) or the diffusers folder of the model (--base DIR)"
            )
        with tempfile.TemporaryDirectory(prefix="gen-flow-configs-") as tmp:
            folder = config_folder(family, transformer_source(path), sources, Path(tmp))
            return _assemble(path, folder, family, sources, torch_dtype, allow_pickle, "gen's shipped")
    base = Path(base)
    cls = base_class(base)
    if not cls.__name__.lower().startswith(family):
        raise ValueError(f"--base {base} is a {cls.__name__} folder; {path.name} needs an {name} folder")
    return _assemble(path, base, family, sources, torch_dtype, allow_pickle)


def part_sources(path: Path, family: str, text_encoders=(), vae=None) -> dict:
    """Where each part comes from: the files given win over those packed in the transformer's file."""
    for given in text_encoders:
        if identify(given)[0] == "vae":
            raise ValueError(f"--text-encoder {Path(given).name}: a VAE file; give it as --vae")
    if vae is not None and (kind := identify(vae)[0]) != "vae":
        what = {"clip": "CLIP", "t5xxl": "T5"}[kind]
        raise ValueError(f"--vae {Path(vae).name}: a {what} text encoder file; give it as --text-encoder")
    packed = packed_sources(path, family)
    return packed | file_sources([*text_encoders, *([vae] if vae else [])], family, have=set(packed))


def _assemble(
    path: Path, folder: Path, family: str, sources: dict, torch_dtype, allow_pickle: bool, configs: str = ""
):
    cls = base_class(folder)
    transformer = load_transformer(path, folder, family, torch_dtype, configs or f"{folder}'s")
    parts = load_parts(sources, folder, family, torch_dtype)
    return cls.from_pretrained(
        folder, transformer=transformer, **parts, allow_pickle=allow_pickle, dtype=torch_dtype
    )


def check_tokenizer(tokenizer, text_encoder, folder: Path, name: str = "tokenizer") -> None:
    """A tokenizer folder missing its vocabulary loads without error as a 2-token tokenizer; catch that here."""
    expected = text_encoder.config.vocab_size
    if len(tokenizer) < expected // 2:
        raise ValueError(
            f"{folder / name}: the tokenizer has {len(tokenizer)} tokens but the text encoder expects"
            f" {expected}; are vocab.json and merges.txt (or tokenizer.json) missing?"
        )
