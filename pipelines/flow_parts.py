"""Where an SD3/Flux pipeline's VAE and text encoders come from when its transformer is a single file: packed in
that file (all-in-one checkpoints), or separate files of the layouts users download beside it (ComfyUI's
`clip_l.safetensors`, `clip_g.safetensors`, `t5xxl_fp16.safetensors`, Black Forest Labs' `ae.safetensors`),
whose kind is read from their keys as ComfyUI's loaders do.

A part is a `Source`: a file and the key prefix its tensors carry there. Each is read alone (get_slice for shapes,
the part's tensors only for weights), so a 20 GB all-in-one file is never held whole. A part may also be a
`Folder`: a transformers text-encoder folder (a T5 such as google/t5-v1_1-xxl, a diffusers repo's text_encoder_3)
or a diffusers VAE folder, loaded by its library's from_pretrained with its own config.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")  # diffusers' LDM_VAE_KEYS
TEXT_PREFIX = "text_encoders.{}.transformer."
# the text encoders a pipeline of each family takes, by component name, and the kind of each
PACKED_TEXT = {
    "sd3": {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5xxl"},
    "flux": {"text_encoder": "clip_l", "text_encoder_2": "t5xxl"},
}
# parts a pipeline cannot run without (SD3 runs without T5, as diffusers allows)
REQUIRED = {
    "sd3": ("vae", "text_encoder", "text_encoder_2"),
    "flux": ("vae", "text_encoder", "text_encoder_2"),
}
# the key ending that tells each kind of separate file, with everything before it the file's prefix
MARKS = {
    "clip": "text_model.final_layer_norm.weight",
    "t5xxl": "encoder.block.0.layer.0.SelfAttention.q.weight",
    "vae": "decoder.conv_in.weight",
}
REAL_CLIP = {768: "clip_l", 1280: "clip_g"}
# The keys of an all-in-one file's parts other than the transformer.
PACKED_PREFIXES = (*VAE_PREFIXES, "text_encoders.")


def count_indices(keys: Iterable[str], pattern: str) -> int:
    """How many blocks `pattern` (a regex with one group, the index) finds among the keys: the highest index + 1."""
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


@dataclass(frozen=True)
class Source:
    """One part's tensors: those of `path` whose keys start with `prefix` (the prefix dropped)."""

    path: Path
    prefix: str = ""

    def _keys(self, f) -> list[str]:
        return [k for k in f.keys() if k.startswith(self.prefix)]

    def shapes(self) -> dict[str, tuple]:
        with safe_open(str(self.path), framework="pt") as f:
            return {k[len(self.prefix) :]: tuple(f.get_slice(k).get_shape()) for k in self._keys(f)}

    def tensors(self, add: str = "", dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The part's tensors, renamed `add` + key (the packed naming diffusers' converters read), ComfyUI's
        scaled fp8 weights multiplied out in `dtype` (the precision the part will run in)."""
        with safe_open(str(self.path), framework="pt") as f:
            sd = {k[len(self.prefix) :]: f.get_tensor(k) for k in self._keys(f)}
        return {add + k: v for k, v in dequantize_scaled_fp8(sd, dtype).items()}


def dequantize_scaled_fp8(
    sd: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """ComfyUI's "scaled fp8" files (t5xxl_fp8_e4m3fn_scaled, some fp8 transformers) hold each weight as fp8 with a
    `scale_weight` beside it and a `scaled_fp8` marker: the real weight is their product. diffusers' converters
    know neither key, so the product is taken here (in fp32, stored in `dtype`: a 12 B Flux in bf16 must not pass
    through 48 GB of fp32) and the scales dropped; plain fp8 files pass as they are (their values cast up later)."""
    scales = [k for k in sd if k.endswith(".scale_weight")]
    if not scales and "scaled_fp8" not in sd:
        return sd
    out = dict(sd)
    for key in scales:
        weight = key.removesuffix(".scale_weight") + ".weight"
        if weight in out:
            out[weight] = (out[weight].float() * out[key].float()).to(dtype)
        del out[key]
    for key in [k for k in out if k.endswith(".scale_input") or k == "scaled_fp8"]:
        del out[key]
    return out


@dataclass(frozen=True)
class Folder:
    """A part saved by from_pretrained's counterpart: config.json and its weights."""

    path: Path

    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())


# a folder's config -> the kind of part it is
FOLDER_KINDS = {"t5": "t5xxl", "clip_text_model": "clip", "AutoencoderKL": "vae"}


def _folder_kind(path: Path) -> tuple[str, Folder]:
    """A folder's kind from its config: a T5 (encoder-only or whole: T5EncoderModel reads the encoder out of
    either), a CLIP text model, or a diffusers AutoencoderKL."""
    folder = Folder(path)
    try:
        config = folder.config()
    except (OSError, ValueError):
        raise ValueError(f"{path}: a folder without a readable config.json; not a model folder") from None
    found = config.get("model_type") or config.get("_class_name")
    if found not in FOLDER_KINDS:
        raise ValueError(
            f"{path}: a {found} folder; a text encoder folder is a transformers T5 or CLIP text model, a VAE folder"
            " a diffusers AutoencoderKL"
        )
    return FOLDER_KINDS[found], folder


def _file_keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def packed_sources(path: str | Path, family: str) -> dict[str, Source]:
    """The VAE and text encoders an all-in-one file carries, by pipeline component name."""
    path = Path(path)
    keys = _file_keys(path)
    found = {}
    for prefix in VAE_PREFIXES:
        if any(k.startswith(prefix) for k in keys):
            found["vae"] = Source(path, prefix)
            break
    for name, kind in PACKED_TEXT[family].items():
        prefix = TEXT_PREFIX.format(kind)
        if any(k.startswith(prefix) for k in keys):
            found[name] = Source(path, prefix)
    return found


def transformer_source(path: str | Path) -> Source:
    path = Path(path)
    return Source(path, PREFIX if any(k.startswith(PREFIX) for k in _file_keys(path)) else "")


def identify(path: str | Path) -> tuple[str, Source | Folder]:
    """("clip" | "t5xxl" | "vae", where it is) for a separate part file or folder; ValueError in one line for
    anything else."""
    path = Path(path)
    if path.is_dir():
        return _folder_kind(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file or folder")
    try:
        keys = _file_keys(path)
    except Exception:  # noqa: BLE001 -- any unreadable file gets the same one-line answer
        raise ValueError(f"{path.name}: not a .safetensors file gen can read") from None
    for kind, mark in MARKS.items():
        for k in keys:
            if k.endswith(mark):
                prefix = k[: -len(mark)]
                if kind == "vae" and prefix + "encoder.down.0.block.0.conv1.weight" not in keys:
                    continue  # diffusers' own VAE layout (up_blocks...): not an original-layout file
                return kind, Source(path, prefix)
    raise ValueError(
        f"{path.name}: not a text encoder or VAE file gen can read: a CLIP (text_model.*), T5 (encoder.block.*)"
        " or original-layout VAE (encoder.down.*, decoder.up.*)"
    )


def _width(source: Source | Folder) -> int:
    if isinstance(source, Folder):
        return source.config()["hidden_size"]
    return source.shapes()["text_model.final_layer_norm.weight"][0]


def _clip_slots(clips: list, family: str, have: set[str]) -> dict:
    """CLIP files to components: Flux takes one (CLIP-L); SD3 two, the narrower CLIP-L (768 < 1280, as in every
    SD3), or one: by a released model's width (768 CLIP-L, 1280 CLIP-G), else into the slot the file leaves.
    config_folder's check_fits then refuses a CLIP that does not fit the transformer."""
    names = [n for n, kind in PACKED_TEXT[family].items() if kind != "t5xxl"]
    if len(clips) > len(names):
        raise ValueError(
            f"{len(clips)} CLIP files given; {family.upper()} takes {len(names)}: "
            + ", ".join(s.path.name for s in clips)
        )
    clips = sorted(clips, key=_width)
    if len(clips) == len(names):
        return dict(zip(names, clips, strict=True))
    if not clips:
        return {}
    kind = REAL_CLIP.get(_width(clips[0]))
    if kind is not None:  # a real CLIP-L or CLIP-G goes where its width says, whatever the file packs
        return {n: clips[0] for n in names if PACKED_TEXT[family][n] == kind}
    missing = [n for n in names if n not in have]
    if len(missing) == 1:
        return {missing[0]: clips[0]}
    raise ValueError(
        f"{clips[0].path.name}: a CLIP {_width(clips[0])} wide; SD3 needs CLIP-L and CLIP-G, give both files"
    )


def file_sources(paths: list[str | Path], family: str, have: set[str] = frozenset()) -> dict:
    """Separate part files (and folders) to the components they fill, by the kind their keys show; `have`: what the transformer
    file already carries (a CLIP file fills the slot still empty)."""
    by_kind: dict[str, list[Source | Folder]] = {"clip": [], "t5xxl": [], "vae": []}
    for path in paths:
        kind, source = identify(path)
        by_kind[kind].append(source)
    for kind, label in (("t5xxl", "T5"), ("vae", "VAE")):
        if len(by_kind[kind]) > 1:
            raise ValueError(
                f"{len(by_kind[kind])} {label} files given, one is taken: "
                + ", ".join(s.path.name for s in by_kind[kind])
            )
    found = _clip_slots(by_kind["clip"], family, have)
    if by_kind["vae"]:
        found["vae"] = by_kind["vae"][0]
    t5 = next(n for n, kind in PACKED_TEXT[family].items() if kind == "t5xxl")
    if by_kind["t5xxl"]:
        found[t5] = by_kind["t5xxl"][0]
    return found


def describe(name: str, family: str) -> str:
    """How a component is called to users ("the VAE", "CLIP-L", "T5")."""
    kind = "vae" if name == "vae" else PACKED_TEXT[family].get(name, name)
    return {"vae": "VAE", "clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5xxl": "T5"}[kind]
