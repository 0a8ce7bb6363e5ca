"""LoRA on TextToImagePipeline for both denoisers, in diffusers' file format.

diffusers' pipeline-level LoRA mixins each assume one architecture (`unet` for SD, `transformer` for SD3/Flux
with their own key conversions). Ours delegates to the model-level PeftAdapterMixin that both the DiT and
UNet2DConditionModel carry, and adds what gen promises: safetensors only, and a clear error for a LoRA made for
another model. Files hold peft keys prefixed with the component name ("transformer." / "unet.", and
"text_encoder." when the text encoder was adapted too) and the adapters' LoraConfig under the
"lora_adapter_metadata" header key, as diffusers' `load_lora_weights` reads and writes them.

SDXL pipelines also adapt `text_encoder_2`; their kohya files (`lora_unet_…`, `lora_te1_…`, `lora_te2_…`) go through
diffusers' StableDiffusionXLLoraLoaderMixin converter.

`load_lora_weights` takes what StableDiffusionPipeline's takes, from local paths only: a file, a folder (with
`weight_name=`, default pytorch_lora_weights.safetensors) or a state dict. On a UNet pipeline, kohya / A1111 files
(`lora_unet_…` / `lora_te_…` keys with `.alpha`) and older diffusers files go through diffusers' own converter
(`StableDiffusionLoraLoaderMixin.lora_state_dict`), so they give the images StableDiffusionPipeline gives.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

METADATA_KEY = "lora_adapter_metadata"  # diffusers' name for the adapters' LoraConfig in the file header
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"  # SDXL's second encoder
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default weight_name in a LoRA folder
PICKLE_LORA_FILE = "pytorch_lora_weights.bin"  # its pickle twin, read only with allow_pickle
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")  # kohya-ss / A1111 key names
# diffusers' download options: no-ops for the local paths gen loads, accepted so diffusers code runs unchanged.
HUB_OPTIONS = {"cache_dir", "force_download", "proxies", "local_files_only", "token", "revision"}


def _lora_file(
    source: Path, weight_name: str | None, subfolder: str | None, use_safetensors: bool | None
) -> Path:
    """The file a path names: itself, or in a folder `weight_name` (default pytorch_lora_weights.safetensors, then
    its .bin twin, as diffusers looks). Nothing is downloaded."""
    path = source / subfolder if subfolder else source
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(
            f"LoRA {str(path)!r} does not exist; give a local file, a folder holding {LORA_FILE}, or a state dict"
            " (nothing is downloaded)"
        )
    names = [weight_name] if weight_name else [LORA_FILE, PICKLE_LORA_FILE]
    if use_safetensors is False and not weight_name:
        names.reverse()
    elif use_safetensors and not weight_name:
        names = names[:1]
    for name in names:
        if (path / name).is_file():
            return path / name
    found = sorted(p.name for p in path.glob("*.safetensors") if not p.name.endswith("_emb.safetensors"))
    raise FileNotFoundError(
        f"{path / names[0]} does not exist; pass weight_name= the LoRA file in that folder"
        f" ({', '.join(found) if found else 'it has no .safetensors files'})"
    )


def _read(path: Path, allow_pickle: bool) -> tuple[dict, dict | None]:
    if path.suffix.lower() != ".safetensors":
        if not allow_pickle:
            raise ValueError(
                f"{path}: only .safetensors LoRA files are loaded (pickle can run code); allow_pickle=True to override"
            )
        return torch.load(path, map_location="cpu", weights_only=True), None
    from safetensors import safe_open

    from gen.loading.safety import check_weight_file

    check_weight_file(path)
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    try:
        metadata = json.loads(raw) if raw else None
    except ValueError:
        raise ValueError(f"{path}: its {METADATA_KEY} header is not valid JSON") from None
    return load_file(str(path)), metadata


def _tuner_layers(module: torch.nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


class LoraMixin:
    def _lora_prefix(self) -> str:
        return self.denoiser_name

    def _adapted(self) -> dict[str, torch.nn.Module]:
        """Components that may carry adapters, by their prefix in LoRA files."""
        return {self._lora_prefix(): self.denoiser, **self._text_encoders()}

    def _text_encoders(self) -> dict[str, torch.nn.Module]:
        """The text encoders, by their prefix in LoRA files (SDXL has two)."""
        encoders = {TEXT_ENCODER: self.text_encoder}
        if getattr(self, TEXT_ENCODER_2, None) is not None:
            encoders[TEXT_ENCODER_2] = self.text_encoder_2
        return encoders

    def _text_encoder_adapters(self, encoder: torch.nn.Module | None = None) -> set[str]:
        return set(getattr(encoder or self.text_encoder, "peft_config", None) or {})

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | Path | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        allow_pickle: bool = False,
        **kwargs,
    ) -> str:
        """Load a LoRA (denoiser, and text encoder if it has one) as a named adapter; returns the name.

        As StableDiffusionPipeline.load_lora_weights: a file, a folder (`weight_name=`, default
        pytorch_lora_weights.safetensors; `subfolder=`) or a state dict (dict of tensors); kohya / A1111 files on
        a UNet. Local paths only, safetensors only unless allow_pickle=True (pickle can run code). A DreamBooth
        identifier embedding `<stem>_emb.safetensors` beside the file is loaded with it.
        """
        weight_name = kwargs.pop("weight_name", None)
        subfolder = kwargs.pop("subfolder", None)
        use_safetensors = kwargs.pop("use_safetensors", None)
        unknown = sorted(set(kwargs) - HUB_OPTIONS)
        if unknown:
            raise TypeError(
                f"load_lora_weights() got unexpected keyword arguments {unknown}; it takes adapter_name,"
                " weight_name, subfolder, use_safetensors, allow_pickle (and diffusers' download options, unused)"
            )
        source = pretrained_model_name_or_path_or_dict
        path = None
        if isinstance(source, dict):
            bad = next((k for k, v in source.items() if not isinstance(v, torch.Tensor)), None)
            if bad is not None:
                raise ValueError(
                    f"the LoRA state dict's {bad!r} is not a tensor ({type(source[bad]).__name__}); give names -> tensors"
                )
            state, metadata, label = dict(source), None, "the LoRA state dict"
        elif isinstance(source, (str, os.PathLike)):
            path = _lora_file(Path(source), weight_name, subfolder, use_safetensors)
            state, metadata = _read(path, allow_pickle)
            label = str(path)
        else:
            raise TypeError(
                f"load_lora_weights() takes a file, a folder or a state dict, got {type(source).__name__}"
            )
        state, network_alphas = self._convert_lora(state, label)
        if network_alphas:
            metadata = None  # kohya's alphas give the scales (diffusers takes one or the other)
        prefix = self._lora_prefix()
        mine = {k: v for k, v in state.items() if k.startswith(prefix + ".")}
        texts = {
            name: {k: v for k, v in state.items() if k.startswith(name + ".")}
            for name in self._text_encoders()
        }
        found = sorted({k.split(".")[0] for k in state})
        if not mine:
            raise ValueError(
                f"{label} is a LoRA for {', '.join(found) or 'nothing'}; this pipeline's denoiser is `{prefix}`"
            )
        other = [f for f in found if f != prefix and f not in texts]
        if other:
            kind = "SD 1.x/2.x" if self.is_sdxl else "SDXL"
            raise ValueError(
                f"{label} also has weights for {', '.join(other)}, which this pipeline lacks (a LoRA for another"
                f" model, e.g. {kind}?); it has `{prefix}` and {', '.join(f'`{t}`' for t in texts)}"
            )
        name = (
            adapter_name
            or f"adapter_{len(self.denoiser.peft_config) if getattr(self.denoiser, 'peft_config', None) else 0}"
        )
        try:
            self.denoiser.load_lora_adapter(
                mine, prefix=prefix, adapter_name=name, metadata=metadata, network_alphas=network_alphas
            )
            from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

            for encoder_name, text in texts.items():
                if text:
                    StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(
                        text,
                        network_alphas=network_alphas,
                        text_encoder=getattr(self, encoder_name),
                        prefix=encoder_name,
                        adapter_name=name,
                        _pipeline=self,
                        metadata=metadata,
                    )
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            detail = str(e).strip().splitlines()[-1][:300]
            raise ValueError(
                f"{label} does not fit this {type(self.denoiser).__name__} (another model's LoRA?): {detail}"
            ) from None
        if path is not None:
            self._load_identifier(path.with_name(path.stem + "_emb.safetensors"))
        return name

    def _convert_lora(self, state: dict, label: str) -> tuple[dict, dict | None]:
        """kohya / A1111 and older diffusers key names -> diffusers' (`unet.…`, `text_encoder.…`), with kohya's
        per-module alphas, by diffusers' own StableDiffusionLoraLoaderMixin.lora_state_dict (UNet pipelines)."""
        alphas = None
        if self.denoiser_name == "transformer" and any(k.startswith(KOHYA_PREFIXES) for k in state):
            raise ValueError(
                f"{label} is a kohya / A1111 LoRA (lora_unet_… / lora_te_… keys): those are for Stable Diffusion"
                " UNets, not this pipeline's DiT"
            )
        if self.denoiser_name == "unet":
            from diffusers.loaders.lora_pipeline import (
                StableDiffusionLoraLoaderMixin,
                StableDiffusionXLLoraLoaderMixin,
            )

            loader = StableDiffusionXLLoraLoaderMixin if self.is_sdxl else StableDiffusionLoraLoaderMixin
            try:
                state, alphas = loader.lora_state_dict(state)
            except (ValueError, KeyError, RuntimeError) as e:  # kohya keys it cannot map
                detail = f"no {e}" if isinstance(e, KeyError) else " ".join(str(e).split())[:300]
                raise ValueError(f"{label}: diffusers cannot convert this kohya LoRA: {detail}") from None
        odd = next((k for k in state if "lora" not in k), None)
        if odd is not None:
            raise ValueError(f"{label} is not a LoRA: its key {odd!r} names no LoRA weight")
        mixed = next((k for k in state if k.startswith(KOHYA_PREFIXES)), None)
        if mixed is not None:
            raise ValueError(
                f"{label} mixes kohya keys ({mixed!r}) with other keys; diffusers converts only all-kohya files"
            )
        return state, alphas

    def _load_identifier(self, path: Path) -> None:
        """A DreamBooth LoRA trained with --train-identifier has the identifier's token embedding beside it (a
        textual-inversion file); it is loaded with the LoRA, as a token that takes the word's place."""
        if not path.is_file():
            return
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            tokens = [t for t in f.keys() if t not in self.tokenizer.get_vocab()]
        if tokens:
            self.load_textual_inversion(str(path))
            self._lora_tokens = [*getattr(self, "_lora_tokens", []), *tokens]

    def _scale_text_encoder_lora(self, cross_attention_kwargs: dict | None) -> None:
        """What StableDiffusionPipeline.encode_prompt does with `lora_scale`: the text encoder's LoRA layers
        scaled by cross_attention_kwargs["scale"] while the prompt is encoded (the denoiser scales its own in
        forward). `_unscale_text_encoder_lora` undoes it after encoding."""
        self._unscale_text_encoder_lora()  # left scaled by a call that raised while encoding
        if cross_attention_kwargs is None:
            return
        if not isinstance(cross_attention_kwargs, dict):
            raise ValueError(
                f"cross_attention_kwargs must be a dict such as {{'scale': 0.5}}, got {cross_attention_kwargs!r}"
            )
        scale = cross_attention_kwargs.get("scale")
        if scale is None:
            return
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(
                f"cross_attention_kwargs['scale'] {scale!r} must be a finite number (LoRA weight)"
            )
        from diffusers.utils.peft_utils import scale_lora_layers

        for encoder in self._text_encoders().values():
            scale_lora_layers(encoder, scale)
        self._text_encoder_lora_scale = scale

    def _unscale_text_encoder_lora(self) -> None:
        from diffusers.utils.peft_utils import unscale_lora_layers

        scale, self._text_encoder_lora_scale = getattr(self, "_text_encoder_lora_scale", None), None
        if scale is not None:
            for encoder in self._text_encoders().values():
                unscale_lora_layers(encoder, scale)

    def save_lora_weights(self, path: str | Path, adapter_name: str = "default") -> Path:
        """Write the adapter `adapter_name` of the denoiser (and of the text encoder, if it has one) atomically."""
        from peft.utils import get_peft_model_state_dict

        from gen.files import atomic_write

        state, metadata = {}, {}
        for prefix, module in self._adapted().items():
            if adapter_name not in (getattr(module, "peft_config", None) or {}):
                continue
            weights = get_peft_model_state_dict(module, adapter_name=adapter_name)
            state |= {f"{prefix}.{k}": v.detach().contiguous() for k, v in weights.items()}
            config = module.peft_config[adapter_name].to_dict()
            metadata |= {f"{prefix}.{k}": sorted(v) if isinstance(v, set) else v for k, v in config.items()}
        if not state:
            raise ValueError(f"this pipeline has no LoRA adapter named {adapter_name!r} to save")
        path = Path(path)
        header = {"format": "pt", METADATA_KEY: json.dumps(metadata, sort_keys=True, default=str)}
        with atomic_write(path) as tmp:
            save_file(state, str(tmp), metadata=header)
        return path

    def set_adapters(
        self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None
    ) -> None:
        """Activate adapters with weights, in the denoiser and in the text encoder where it has them."""
        from diffusers.utils.peft_utils import set_weights_and_activate_adapters

        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = (
            adapter_weights if isinstance(adapter_weights, list) else [adapter_weights or 1.0] * len(names)
        )
        self.denoiser.set_adapters(names, weights)
        for encoder in self._text_encoders().values():
            text = self._text_encoder_adapters(encoder)
            if text:
                pairs = [(n, w) for n, w in zip(names, weights, strict=True) if n in text]
                set_weights_and_activate_adapters(encoder, [n for n, _ in pairs], [w for _, w in pairs])

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names: list[str] | None = None) -> None:
        self.denoiser.fuse_lora(lora_scale=lora_scale, adapter_names=adapter_names)
        for layer in (t for e in self._text_encoders().values() for t in _tuner_layers(e)):
            if lora_scale != 1.0:
                layer.scale_layer(lora_scale)
            layer.merge(adapter_names=adapter_names)

    def unfuse_lora(self) -> None:
        self.denoiser.unfuse_lora()
        for layer in (t for e in self._text_encoders().values() for t in _tuner_layers(e)):
            layer.unmerge()

    def unload_lora_weights(self) -> None:
        from diffusers.utils.peft_utils import recurse_remove_peft_layers

        self.denoiser.unload_lora()
        for token in getattr(self, "_lora_tokens", []):
            self.unload_textual_inversion(token)
        self._lora_tokens = []
        for encoder in self._text_encoders().values():
            if self._text_encoder_adapters(encoder):
                recurse_remove_peft_layers(encoder)
                del encoder.peft_config
                encoder._hf_peft_config_loaded = False
