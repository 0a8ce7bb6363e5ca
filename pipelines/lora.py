"""LoRA on TextToImagePipeline for both denoisers, in diffusers' file format.

diffusers' pipeline-level LoRA mixins each assume one architecture (`unet` for SD, `transformer` for SD3/Flux
with their own key conversions). Ours delegates to the model-level PeftAdapterMixin that both the DiT and
UNet2DConditionModel carry, and adds what gen promises: safetensors only, and a clear error for a LoRA made for
another model. Files hold peft keys prefixed with the component name ("transformer." / "unet.", and
"text_encoder." when the text encoder was adapted too) and the adapters' LoraConfig under the
"lora_adapter_metadata" header key, as diffusers' `load_lora_weights` reads and writes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

METADATA_KEY = "lora_adapter_metadata"  # diffusers' name for the adapters' LoraConfig in the file header
TEXT_ENCODER = "text_encoder"


def _read(path: Path, allow_pickle: bool) -> tuple[dict, dict | None]:
    if path.suffix.lower() != ".safetensors":
        if not allow_pickle:
            raise ValueError(
                f"{path}: only .safetensors LoRA files are loaded (pickle can run code); allow_pickle=True to override"
            )
        return torch.load(path, map_location="cpu", weights_only=True), None
    from safetensors import safe_open

    from gen.safety import check_weight_file

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
        return {self._lora_prefix(): self.denoiser, TEXT_ENCODER: self.text_encoder}

    def _text_encoder_adapters(self) -> set[str]:
        return set(getattr(self.text_encoder, "peft_config", None) or {})

    def load_lora_weights(
        self, path: str | Path, adapter_name: str | None = None, allow_pickle: bool = False
    ) -> str:
        """Load a LoRA file (denoiser, and text encoder if it has one) as a named adapter; returns the name."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"LoRA file {str(path)!r} does not exist")
        state, metadata = _read(path, allow_pickle)
        prefix = self._lora_prefix()
        mine = {k: v for k, v in state.items() if k.startswith(prefix + ".")}
        text = {k: v for k, v in state.items() if k.startswith(TEXT_ENCODER + ".")}
        if not mine:
            found = sorted({k.split(".")[0] for k in state})
            raise ValueError(
                f"{path} is a LoRA for {', '.join(found) or 'nothing'}; this pipeline's denoiser is `{prefix}`"
            )
        name = (
            adapter_name
            or f"adapter_{len(self.denoiser.peft_config) if getattr(self.denoiser, 'peft_config', None) else 0}"
        )
        try:
            self.denoiser.load_lora_adapter(mine, prefix=prefix, adapter_name=name, metadata=metadata)
            if text:
                from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

                StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(
                    text, network_alphas=None, text_encoder=self.text_encoder, prefix=TEXT_ENCODER,
                    adapter_name=name, _pipeline=self, metadata=metadata,
                )  # fmt: skip
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            detail = str(e).strip().splitlines()[-1][:300]
            raise ValueError(
                f"{path} does not fit this {type(self.denoiser).__name__} (another model's LoRA?): {detail}"
            ) from None
        self._load_identifier(path.with_name(path.stem + "_emb.safetensors"))
        return name

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
        text = self._text_encoder_adapters()
        if text:
            pairs = [(n, w) for n, w in zip(names, weights, strict=True) if n in text]
            set_weights_and_activate_adapters(self.text_encoder, [n for n, _ in pairs], [w for _, w in pairs])

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names: list[str] | None = None) -> None:
        self.denoiser.fuse_lora(lora_scale=lora_scale, adapter_names=adapter_names)
        for layer in _tuner_layers(self.text_encoder):
            if lora_scale != 1.0:
                layer.scale_layer(lora_scale)
            layer.merge(adapter_names=adapter_names)

    def unfuse_lora(self) -> None:
        self.denoiser.unfuse_lora()
        for layer in _tuner_layers(self.text_encoder):
            layer.unmerge()

    def unload_lora_weights(self) -> None:
        from diffusers.utils.peft_utils import recurse_remove_peft_layers

        self.denoiser.unload_lora()
        for token in getattr(self, "_lora_tokens", []):
            self.unload_textual_inversion(token)
        self._lora_tokens = []
        if self._text_encoder_adapters():
            recurse_remove_peft_layers(self.text_encoder)
            del self.text_encoder.peft_config
            self.text_encoder._hf_peft_config_loaded = False
