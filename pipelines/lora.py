"""LoRA on TextToImagePipeline for both denoisers, in diffusers' file format.

diffusers' pipeline-level LoRA mixins each assume one architecture (`unet` for SD, `transformer` for SD3/Flux
with their own key conversions). Ours delegates to the model-level PeftAdapterMixin that both the DiT and
UNet2DConditionModel carry, and adds what gen promises: safetensors only, and a clear error for a LoRA made for
another model. Files hold peft keys prefixed with the component name ("transformer." / "unet."), as
`load_lora_weights` in diffusers expects.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class LoraMixin:
    def _lora_prefix(self) -> str:
        return "transformer" if self.transformer is not None else "unet"

    def load_lora_weights(
        self, path: str | Path, adapter_name: str | None = None, allow_pickle: bool = False
    ) -> str:
        """Load a LoRA file into the denoiser as a named adapter; returns the adapter's name."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"LoRA file {str(path)!r} does not exist")
        if path.suffix.lower() != ".safetensors":
            if not allow_pickle:
                raise ValueError(
                    f"{path}: only .safetensors LoRA files are loaded (pickle can run code); allow_pickle=True to override"
                )
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            from gen.safety import check_weight_file

            check_weight_file(path)
            state = load_file(str(path))
        prefix = self._lora_prefix()
        mine = {k: v for k, v in state.items() if k.startswith(prefix + ".")}
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
            self.denoiser.load_lora_adapter(mine, prefix=prefix, adapter_name=name)
        except (RuntimeError, ValueError, KeyError) as e:
            detail = str(e).strip().splitlines()[-1][:300]
            raise ValueError(
                f"{path} does not fit this {type(self.denoiser).__name__} (another model's LoRA?): {detail}"
            ) from None
        return name

    def save_lora_weights(self, path: str | Path, adapter_name: str = "default") -> Path:
        from peft.utils import get_peft_model_state_dict

        prefix = self._lora_prefix()
        state = get_peft_model_state_dict(self.denoiser, adapter_name=adapter_name)
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(
            {f"{prefix}.{k}": v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"}
        )
        tmp.replace(path)
        return path

    def set_adapters(
        self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None
    ) -> None:
        self.denoiser.set_adapters(adapter_names, adapter_weights)

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names: list[str] | None = None) -> None:
        self.denoiser.fuse_lora(lora_scale=lora_scale, adapter_names=adapter_names)

    def unfuse_lora(self) -> None:
        self.denoiser.unfuse_lora()

    def unload_lora_weights(self) -> None:
        self.denoiser.unload_lora()
