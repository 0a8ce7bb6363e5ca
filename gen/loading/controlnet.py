"""ControlNets from disk, offline: a diffusers folder (config.json and weights), or one file in the original
layout A1111's sd-webui-controlnet and lllyasviel's releases use (`input_blocks`, `zero_convs`, `input_hint_block`,
with or without the `control_model.` prefix), for SD 1.x, 2.x and SDXL.

diffusers converts the original keys (convert_controlnet_checkpoint, behind ControlNetModel.from_single_file) but
fetches the architecture's config from the hub and drops SDXL's added embedding; gen derives the config from the
shipped UNet config of the base the file's keys name (a ControlNet copies its UNet's encoder half), maps that
embedding too, and loads every key strictly, so nothing is downloaded and nothing is left random. The reverse conversion (`to_original`) is here for the tests and
for exporting: diffusers has none.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import init_empty_weights
from diffusers import ControlNetModel
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint
from safetensors.torch import load_file

from gen.pipelines.single_file import CONFIGS, _unet_key, check_single_file

PREFIX = "control_model."  # full checkpoints (ControlNet 1.0) keep the net under this; 1.1 files drop it
# the conditioning embedding's convolutions, diffusers -> original (blocks.k is input_hint_block.2(k+1))
_HINT = {"conv_in": "input_hint_block.0", "conv_out": "input_hint_block.14"}
_ADDED = DIFFUSERS_TO_LDM_MAPPING["controlnet"][
    "addition_embed_type"
]  # SDXL's label_emb, diffusers -> original


def load_controlnet(
    path: str | Path,
    torch_dtype: torch.dtype = torch.float32,
    config: str | Path | None = None,
    allow_pickle: bool = False,
    global_pool_conditions: bool | None = None,
) -> ControlNetModel:
    """A ControlNetModel from a diffusers folder or one original-layout file. `config`: a folder with a matching
    config.json for a file whose architecture the shipped configs do not describe (ControlNet-XS, SDXL's "small"
    and "mid" nets); by default it is derived from the base the keys name, and `global_pool_conditions` (the
    shuffle net's pooled condition, which puts it in guess mode) is read from the file's name as A1111 does."""
    path = Path(path)
    if path.is_dir():
        return _from_folder(path, torch_dtype, allow_pickle)
    state = _state(check_single_file(path, "ControlNet", allow_pickle))
    if config is not None:
        settings = json.loads((Path(config) / "config.json").read_text())
        what = f"the config in {config}"
    else:
        version = detect_version({k: tuple(v.shape) for k, v in state.items()}, str(path))
        settings, what = controlnet_config(version), f"a {version} ControlNet's architecture"
        # The shuffle net pools its condition (A1111 reads that from control_v11e_sd15_shuffle.yaml, picked by the
        # file's name; the weights do not say it)
        pool = "shuffle" in path.name.lower() if global_pool_conditions is None else global_pool_conditions
        settings["global_pool_conditions"] = pool
    return _build(state, settings, torch_dtype, f"{path} does not fit {what}")


def _from_folder(folder: Path, torch_dtype: torch.dtype, allow_pickle: bool) -> ControlNetModel:
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: not a diffusers ControlNet folder (no config.json)")
    if not allow_pickle and not any(folder.glob("*.safetensors")):
        raise ValueError(f"{folder}: no .safetensors weights (pickle .bin files need allow_pickle=True)")
    try:
        return ControlNetModel.from_pretrained(
            str(folder), torch_dtype=torch_dtype, local_files_only=True, use_safetensors=not allow_pickle
        )
    except (ValueError, RuntimeError, OSError) as e:
        raise ValueError(
            f"{folder}: could not load its ControlNet: {' '.join(str(e).split())[:300]}"
        ) from None


def _state(path: Path) -> dict[str, torch.Tensor]:
    """The file's ControlNet weights; from a whole ControlNet 1.0 checkpoint only those under control_model."""
    if path.suffix.lower() == ".safetensors":
        state = load_file(str(path))
    else:  # reached only with allow_pickle
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    if any(k.startswith(PREFIX) for k in state):
        state = {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
    return state


def _build(
    state: dict[str, torch.Tensor], config: dict, torch_dtype: torch.dtype, fails: str
) -> ControlNetModel:
    """The net of `config` holding `state`, converted from the original layout by diffusers' converter (plus
    SDXL's added embedding, which that converter leaves out); every key must fit, or one line says which."""
    if "time_embedding.linear_1.weight" not in state:  # the original layout
        converted = convert_controlnet_checkpoint(state, config)
        converted |= {new: state[old] for new, old in _ADDED.items() if old in state}
        state = {k: v for k, v in converted.items() if v is not None}
    try:
        with init_empty_weights():
            net = ControlNetModel.from_config(config)
        missing, unexpected = _mismatch(net, state)
        if missing or unexpected:
            raise ValueError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        net.load_state_dict(state, strict=True, assign=True)
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        detail = " ".join(str(e).split())[:300]
        raise ValueError(f"{fails}: {detail}; pass config=<a folder with its config.json>") from None
    return net.to(torch_dtype).eval()


def _mismatch(net: ControlNetModel, state: dict) -> tuple[list[str], list[str]]:
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    missing = sorted(k for k in want if k not in state)
    unexpected = sorted(k for k in state if k not in want or tuple(state[k].shape) != want[k])
    return missing, unexpected


def detect_version(shapes: dict[str, tuple[int, ...]], name: str = "checkpoint") -> str:
    """'v1' (768-wide cross-attention), 'v2' (1024) or 'xl' (SDXL's added size and text embedding), from the
    keys of an original-layout ControlNet (either prefix) or a diffusers-layout one."""
    keys = {k.removeprefix(PREFIX): v for k, v in shapes.items()}
    if "input_hint_block.0.weight" in keys:  # original layout
        xl = "label_emb.0.0.weight" in keys
        attn = [
            v for k, v in keys.items() if k.startswith("input_blocks.") and k.endswith("attn2.to_k.weight")
        ]
    elif "controlnet_cond_embedding.conv_in.weight" in keys:  # diffusers' layout in one file
        xl = "add_embedding.linear_1.weight" in keys
        attn = [
            v for k, v in keys.items() if k.startswith("down_blocks.") and k.endswith("attn2.to_k.weight")
        ]
    else:
        raise ValueError(f"{name}: not a ControlNet (no input_hint_block or controlnet_cond_embedding keys)")
    if xl:
        return "xl"
    width = attn[0][1] if attn else None
    if width not in (768, 1024):
        raise ValueError(
            f"{name}: a ControlNet for a base with {width}-wide text, not SD 1.x (768) or 2.x (1024)"
        )
    return "v1" if width == 768 else "v2"


def controlnet_config(version: str) -> dict:
    """The ControlNet of a base: its UNet's encoder settings (what ControlNetModel.from_unet copies), from the
    shipped UNet config, plus the conditioning embedding's defaults."""
    unet = json.loads((CONFIGS / f"{version}.json").read_text())["unet"]
    accepted = set(inspect.signature(ControlNetModel.__init__).parameters) - {"self"}
    config = {k: v for k, v in unet.items() if k in accepted}
    return {"_class_name": "ControlNetModel", **config}


def to_original(net: ControlNetModel, prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """The net's weights under the original layout's names (the inverse of diffusers' converter)."""
    return {prefix + original_key(k, net.config): v for k, v in net.state_dict().items()}


def original_key(key: str, config) -> str:
    """One diffusers ControlNet key's original-layout name."""
    head, _, rest = key.partition(".")
    if head == "controlnet_cond_embedding":
        part, _, tail = rest.partition(".")
        if part == "blocks":
            index, _, tail = tail.partition(".")
            return f"input_hint_block.{2 * (int(index) + 1)}.{tail}"
        return f"{_HINT[part]}.{tail}"
    if head == "controlnet_down_blocks":
        index, _, tail = rest.partition(".")
        return f"zero_convs.{index}.0.{tail}"
    if head == "controlnet_mid_block":
        return f"middle_block_out.0.{rest}"
    # the encoder half of a UNet: the same names as in a UNet checkpoint (a ControlNet has no up blocks)
    return _unet_key(key, SimpleNamespace(layers_per_block=config.layers_per_block, up_block_types=[]))
