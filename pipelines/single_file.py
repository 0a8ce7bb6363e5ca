"""Single-file Stable Diffusion checkpoints (the original "LDM" key layout), fully offline: what a pipeline's
`from_single_file` calls (load_original), and the export back to that layout.

Loading uses diffusers' single-file loader, which converts the keys, but wants a diffusers config folder that it
would otherwise fetch from the hub. gen ships the SD 1.x and 2.x configs (gen/assets/sd_configs/*.json) and the
CLIP tokenizer files, assembles a config folder from them in a temporary directory, and passes it as `config=`.

Exporting (diffusers folder -> one .safetensors file in the original layout) is written here because diffusers
keeps that conversion in a script outside the package; the test suite checks it against diffusers' own
converter by a round trip.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from importlib.resources import files
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gen.files import atomic_write

# gen/assets, found through the package: this file is pipelines/ in a checkout but gen/pipelines/ once installed.
ASSETS = Path(str(files("gen") / "assets"))
CONFIGS = ASSETS / "sd_configs"
TOKENIZER = ASSETS / "shapes" / "tokenizer"

_RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
]
_VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _sub(key: str, pairs) -> str:
    for new, old in pairs:
        key = key.replace(f".{new}.", f".{old}.")
    return key


def _unet_key(key: str, config) -> str:
    n_layers = config.layers_per_block
    up_attn = ["CrossAttn" in t for t in config.up_block_types]
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",  # SDXL's pooled-text and size embedding
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    head = key.split(".")[0]
    for new, old in fixed.items():
        if key.startswith(new + "."):
            return old + key[len(new) :]
    parts = key.split(".")
    if head == "down_blocks":
        i, kind, j = int(parts[1]), parts[2], int(parts[3])
        tail = ".".join(parts[4:])
        if kind == "downsamplers":
            return f"input_blocks.{(n_layers + 1) * (i + 1)}.0.op.{'.'.join(parts[5:])}"
        block = (n_layers + 1) * i + j + 1
        return _sub(
            f"input_blocks.{block}.{0 if kind == 'resnets' else 1}.{tail}",
            _RESNET if kind == "resnets" else [],
        )
    if head == "up_blocks":
        i, kind, j = int(parts[1]), parts[2], int(parts[3])
        tail = ".".join(parts[4:])
        if kind == "upsamplers":
            return f"output_blocks.{(n_layers + 1) * i + n_layers}.{2 if up_attn[i] else 1}.{'.'.join(parts[4:])}"
        block = (n_layers + 1) * i + j  # an up block has layers_per_block + 1 resnets
        return _sub(
            f"output_blocks.{block}.{0 if kind == 'resnets' else 1}.{tail}",
            _RESNET if kind == "resnets" else [],
        )
    if head == "mid_block":
        kind, j = parts[1], int(parts[2])
        tail = ".".join(parts[3:])
        if kind == "attentions":
            return f"middle_block.1.{tail}"
        return _sub(f"middle_block.{2 * j}.{tail}", _RESNET)
    raise KeyError(f"no original-layout name for UNet key {key!r}")


def _vae_key(key: str, n_blocks: int) -> str:
    parts = key.split(".")
    side = parts[0]  # encoder / decoder / quant_conv / post_quant_conv
    if side in ("quant_conv", "post_quant_conv"):
        return key
    rest = ".".join(parts[1:])
    if parts[1] == "conv_norm_out":
        return f"{side}.norm_out.{'.'.join(parts[2:])}"
    if parts[1] in ("down_blocks", "up_blocks"):
        i, kind = int(parts[2]), parts[3]
        level = i if side == "encoder" else n_blocks - 1 - i
        name = "down" if side == "encoder" else "up"
        if kind in ("downsamplers", "upsamplers"):
            return f"{side}.{name}.{level}.{'downsample' if side == 'encoder' else 'upsample'}.{'.'.join(parts[5:])}"
        rest = f"{name}.{level}.block.{parts[4]}.{'.'.join(parts[5:])}"
    elif parts[1] == "mid_block":
        kind, j = parts[2], int(parts[3])
        tail = ".".join(parts[4:])
        rest = f"mid.attn_1.{tail}" if kind == "attentions" else f"mid.block_{j + 1}.{tail}"
    return _sub(f"{side}.{rest}".replace(".conv_shortcut.", ".nin_shortcut."), _VAE_ATTN)


def to_original(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder weights under the original SD checkpoint's names."""
    if pipe.denoiser_name != "unet":
        raise ValueError("single-file export needs a UNet pipeline (the original layout has no DiT)")
    out = {}
    for key, value in pipe.unet.state_dict().items():
        out["model.diffusion_model." + _unet_key(key, pipe.unet.config)] = value
    out |= vae_to_original(pipe.vae)
    xl = getattr(pipe, "text_encoder_2", None) is not None
    out |= clip_to_original(
        pipe.text_encoder, "conditioner.embedders.0.transformer." if xl else "cond_stage_model.transformer."
    )
    if xl:
        out |= {
            "conditioner.embedders.1.model." + k: v for k, v in open_clip_state(pipe.text_encoder_2).items()
        }
    return {k: v.contiguous() for k, v in out.items()}


def vae_to_original(vae, prefix: str = "first_stage_model.") -> dict[str, torch.Tensor]:
    """An AutoencoderKL's weights under the original (LDM) names, as single files hold their VAE."""
    out = {}
    n_blocks = len(vae.config.block_out_channels)
    for key, value in vae.state_dict().items():
        new = _vae_key(key, n_blocks)
        if ".mid.attn_1." in new and value.ndim == 2:  # the original uses 1x1 convs for the VAE's attention
            value = value[:, :, None, None]
        out[prefix + new] = value
    return out


def clip_to_original(encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model's weights under `prefix` + its original names (`text_model.` kept)."""
    # transformers 5 dropped the `text_model.` prefix from CLIPTextModel (not from ...WithProjection's encoder)
    return {
        prefix + (k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v
        for k, v in encoder.state_dict().items()
    }


def open_clip_state(encoder) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection's weights in OpenCLIP's layout, as SDXL checkpoints hold their second text
    encoder: q/k/v fused into one in-projection, the text projection stored transposed."""
    state = {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}
    out = {
        "token_embedding.weight": state["embeddings.token_embedding.weight"],
        "positional_embedding": state["embeddings.position_embedding.weight"],
        "ln_final.weight": state["final_layer_norm.weight"],
        "ln_final.bias": state["final_layer_norm.bias"],
        "text_projection": state["text_projection.weight"].T,
    }
    names = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2"}
    names |= {"mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(encoder.config.num_hidden_layers):
        ours, theirs = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            qkv = [state[f"{ours}self_attn.{m}_proj.{part}"] for m in ("q", "k", "v")]
            out[f"{theirs}attn.in_proj_{part}"] = torch.cat(qkv)
            out |= {f"{theirs}{new}.{part}": state[f"{ours}{old}.{part}"] for old, new in names.items()}
    return out


def save_single_file(pipe, path: str | Path) -> Path:
    path = Path(path)
    state = to_original(pipe)
    with atomic_write(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "exported_by": "gen"})
    return path


def _keys(path: Path) -> set[str]:
    if path.suffix.lower() == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return set(f.keys())
    state = torch.load(path, map_location="meta", weights_only=True)  # reached only with allow_pickle
    return set(state.get("state_dict", state))


def detect_version(path: str | Path) -> str:
    """'v1' (CLIP ViT-L text encoder, 768-wide cross-attention), 'v2' (OpenCLIP ViT-H, 1024) or 'xl' (SDXL:
    CLIP ViT-L and OpenCLIP ViT-bigG under `conditioner.embedders`)."""
    keys = _keys(Path(path))
    if any(k.startswith("conditioner.embedders.1.model.") for k in keys):
        return "xl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "v2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "v1"
    raise ValueError(
        f"{path}: not a Stable Diffusion 1.x/2.x or SDXL checkpoint (no text-encoder keys of those layouts)"
    )


def unet_in_channels(path: str | Path) -> int:
    """The UNet's input channels from the checkpoint: 4, or 9 for an inpainting checkpoint (latents, mask and
    masked-image latents), as SD-inpainting files are."""
    path = Path(path)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    if path.suffix.lower() != ".safetensors":
        return 4
    with safe_open(str(path), framework="pt") as f:
        return f.get_slice(key).get_shape()[1] if key in f.keys() else 4


def config_folder(version: str, into: Path, in_channels: int = 4) -> Path:
    """Lay out a diffusers config folder for an SD version from the shipped JSON and tokenizer files (an
    inpainting checkpoint's UNet takes `in_channels` 9)."""
    spec = json.loads((CONFIGS / f"{version}.json").read_text())
    spec["unet"] = {**spec["unet"], "in_channels": in_channels}
    into.mkdir(parents=True, exist_ok=True)
    (into / "model_index.json").write_text(json.dumps(spec["model_index"]))
    for name, file in (
        ("unet", "config.json"),
        ("vae", "config.json"),
        ("text_encoder", "config.json"),
        ("text_encoder_2", "config.json"),  # SDXL
        ("scheduler", "scheduler_config.json"),
    ):
        if name in spec:
            (into / name).mkdir(exist_ok=True)
            (into / name / file).write_text(json.dumps(spec[name]))
    for name in ("tokenizer", "tokenizer_2"):  # SDXL's second tokenizer: the same BPE, padding with "!"
        if name in spec:
            shutil.copytree(TOKENIZER, into / name, dirs_exist_ok=True)
            (into / name / "tokenizer_config.json").write_text(json.dumps(spec[name]))
    return into


def check_single_file(path: str | Path, what: str, allow_pickle: bool) -> Path:
    """An existing file, and a .safetensors one unless pickle is allowed; FileNotFoundError / ValueError else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    if path.suffix.lower() != ".safetensors" and not allow_pickle:
        raise ValueError(
            f"{path}: only .safetensors {what}s are loaded (a pickle .ckpt/.pth can run code); convert it, or pass"
            " --allow-pickle / allow_pickle=True (then read with torch.load(weights_only=True))"
        )
    return path


def load_original(
    cls,
    path: str | Path,
    config: str | Path | None = None,
    torch_dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
):
    """A `cls` pipeline from one .safetensors checkpoint, offline. `config`: a diffusers folder whose configs fit
    the checkpoint (default: the shipped SD 1.x, 2.x or SDXL configs, chosen from the checkpoint's keys)."""
    path = check_single_file(path, "checkpoint", allow_pickle)
    with tempfile.TemporaryDirectory(prefix="gen-sd-config-") as tmp:
        version = detect_version(path) if config is None else None
        folder = (
            Path(config) if config is not None else config_folder(version, Path(tmp), unet_in_channels(path))
        )
        try:
            return cls.from_single_file(
                str(path), config=str(folder), local_files_only=True, torch_dtype=torch_dtype
            )
        except (ValueError, RuntimeError) as e:
            what = f"the Stable Diffusion {version} configs" if version else f"the configs in {folder}"
            detail = str(e).split(". If you want")[0]  # diffusers' advice on the hub does not apply offline
            raise ValueError(
                f"{path} does not fit {what}: {detail}; pass config=<a matching diffusers folder>"
            ) from None
