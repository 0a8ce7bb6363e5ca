"""LoRA on gen's pipelines for both denoisers, in diffusers' file format, through diffusers' loader mixin.

The pipeline API is diffusers' StableDiffusionLoraLoaderMixin: set_adapters, fuse_lora / unfuse_lora,
unload_lora_weights, delete_adapters, enable_lora / disable_lora and get_list_adapters are its LoraBaseMixin's,
over the components in `_lora_loadable_modules`. On a UNet pipeline `load_lora_weights` ends in the mixin's own
load_lora_weights (StableDiffusionXLLoraLoaderMixin's on SDXL), so kohya / A1111 files (`lora_unet_…` /
`lora_te_…`, SDXL's `lora_te1_…` / `lora_te2_…`, with `.alpha`) and older diffusers files give the images
StableDiffusion(XL)Pipeline gives.

What gen puts in front of it: local paths only (a file, a folder with `weight_name=`, default
pytorch_lora_weights.safetensors, or a state dict; nothing is downloaded), safetensors only unless allow_pickle=True
(pickle can run code), the file checked whole before it is read, one-line errors for a LoRA made for another model,
and the DreamBooth identifier embedding beside the file. Files hold peft keys prefixed with the component name
("transformer." / "unet.", and "text_encoder." / "text_encoder_2." when the text encoders were adapted too) and the
adapters' LoraConfig under the "lora_adapter_metadata" header key, as diffusers reads and writes them.
"""

from __future__ import annotations

import json
import math
import os
import types
from pathlib import Path

import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, LORA_WEIGHT_NAME, LORA_WEIGHT_NAME_SAFE
from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
from safetensors.torch import load_file, save_file

from gen.files import atomic_write
from gen.pipelines.safety import check_weight_file

METADATA_KEY = LORA_ADAPTER_METADATA_KEY  # the adapters' LoraConfig in the file header
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"  # SDXL's second encoder
LORA_FILE = LORA_WEIGHT_NAME_SAFE  # diffusers' default weight_name in a LoRA folder
PICKLE_LORA_FILE = LORA_WEIGHT_NAME  # its pickle twin, read only with allow_pickle
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")  # kohya-ss / A1111 key names
READ_OPTIONS = ("weight_name", "subfolder", "use_safetensors")
# diffusers' download options: no-ops for the local paths gen loads, accepted so diffusers code runs unchanged.
HUB_OPTIONS = {"cache_dir", "force_download", "proxies", "local_files_only", "token", "revision"}
# diffusers' loading options that change how memory is used, not the result: taken and left to peft's defaults
MEMORY_OPTIONS = {"low_cpu_mem_usage"}


def _weight_names(weight_name: str | None, use_safetensors: bool | None) -> list[str]:
    """The names looked for in a folder, in diffusers' order."""
    if weight_name:
        return [weight_name]
    if use_safetensors:
        return [LORA_FILE]
    return [PICKLE_LORA_FILE, LORA_FILE] if use_safetensors is False else [LORA_FILE, PICKLE_LORA_FILE]


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
    names = _weight_names(weight_name, use_safetensors)
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

    check_weight_file(path)
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    try:
        metadata = json.loads(raw) if raw else None
    except ValueError:
        raise ValueError(f"{path}: its {METADATA_KEY} header is not valid JSON") from None
    return load_file(str(path)), metadata


def _read_options(kwargs: dict) -> dict:
    """load_lora_weights' reading options; anything else but diffusers' (unused) download options is refused."""
    options = {name: kwargs.pop(name, None) for name in READ_OPTIONS}
    unknown = sorted(set(kwargs) - HUB_OPTIONS - MEMORY_OPTIONS)
    if unknown:
        raise TypeError(
            f"load_lora_weights() got unexpected keyword arguments {unknown}; it takes adapter_name,"
            " weight_name, subfolder, use_safetensors, allow_pickle (and diffusers' download options, unused)"
        )
    return options


def _lora_source(source, allow_pickle: bool, options: dict) -> tuple[dict, dict | None, Path | None, str]:
    """The LoRA's state dict, its adapters' LoraConfig (None when the file has none), its file (None for a state
    dict) and its name in errors."""
    if isinstance(source, dict):
        bad = next((k for k, v in source.items() if not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            raise ValueError(
                f"the LoRA state dict's {bad!r} is not a tensor ({type(source[bad]).__name__}); give names -> tensors"
            )
        return dict(source), None, None, "the LoRA state dict"
    if isinstance(source, (str, os.PathLike)):
        path = _lora_file(Path(source), **options)
        state, metadata = _read(path, allow_pickle)
        return state, metadata, path, str(path)
    raise TypeError(
        f"load_lora_weights() takes a file, a folder or a state dict, got {type(source).__name__}"
    )


def _check_lora_keys(state: dict, label: str) -> None:
    odd = next((k for k in state if "lora" not in k), None)
    if odd is not None:
        raise ValueError(f"{label} is not a LoRA: its key {odd!r} names no LoRA weight")
    mixed = next((k for k in state if k.startswith(KOHYA_PREFIXES)), None)
    if mixed is not None:
        raise ValueError(
            f"{label} mixes kohya keys ({mixed!r}) with other keys; diffusers converts only all-kohya files"
        )


def _diffusers_save(cls):
    """diffusers' save_lora_weights (a classmethod: the layers in, a folder out), bound to `cls`."""
    return types.MethodType(StableDiffusionLoraLoaderMixin.save_lora_weights.__func__, cls)


class _class_or_instance:  # noqa: N801 (used as a decorator, like classmethod)
    """On the class, diffusers' classmethod (its tests and scripts call `Pipeline.save_lora_weights(save_directory,
    unet_lora_layers=...)`); on an instance, the decorated method."""

    def __init__(self, method):
        self.method = method
        self.__doc__ = method.__doc__

    def __get__(self, obj, cls=None):
        return _diffusers_save(cls) if obj is None else types.MethodType(self.method, obj)


class LoraMixin(StableDiffusionLoraLoaderMixin):
    # LoraBaseMixin's methods visit these by name and skip those the pipeline lacks: one of the two denoisers,
    # SDXL's second encoder.
    _lora_loadable_modules = ["transformer", "unet", TEXT_ENCODER, TEXT_ENCODER_2]

    def _text_encoders(self) -> dict[str, torch.nn.Module]:
        """The text encoders, by their prefix in LoRA files (SDXL has two)."""
        encoders = {TEXT_ENCODER: self.text_encoder}
        if getattr(self, TEXT_ENCODER_2, None) is not None:
            encoders[TEXT_ENCODER_2] = self.text_encoder_2
        return encoders

    def _unet_loader(self) -> tuple[type[StableDiffusionLoraLoaderMixin], dict]:
        """diffusers' mixin for this UNet and what its load_lora_weights passes lora_state_dict."""
        if self.is_sdxl:
            return StableDiffusionXLLoraLoaderMixin, {"unet_config": self.unet.config}
        return StableDiffusionLoraLoaderMixin, {}

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | Path | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        allow_pickle: bool = False,
        **kwargs,
    ) -> str:
        """Load a LoRA (denoiser, and text encoders if it has them) as a named adapter; returns the name.

        As StableDiffusionPipeline.load_lora_weights: a file, a folder (`weight_name=`, default
        pytorch_lora_weights.safetensors; `subfolder=`) or a state dict (dict of tensors); kohya / A1111 files on
        a UNet. Local paths only, safetensors only unless allow_pickle=True (pickle can run code). A DreamBooth
        identifier embedding `<stem>_emb.safetensors` beside the file is loaded with it.
        """
        options = _read_options(kwargs)
        state, metadata, path, label = _lora_source(
            pretrained_model_name_or_path_or_dict, allow_pickle, options
        )
        converted, alphas = self._convert_lora(state, label)
        self._check_components(converted, label)
        name = adapter_name or f"adapter_{len(getattr(self.denoiser, 'peft_config', None) or {})}"
        try:
            if self.denoiser_name == "unet":
                # diffusers reads the LoraConfig header only from a file (kohya's alphas give the scales instead)
                self._load_unet_lora(str(path) if metadata is not None and not alphas else state, name)
            else:
                self._load_dit_lora(converted, metadata, name)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            detail = str(e).strip().splitlines()[-1][:300]
            raise ValueError(
                f"{label} does not fit this {type(self.denoiser).__name__} (another model's LoRA?): {detail}"
            ) from None
        if path is not None:
            self._load_identifier(path.with_name(path.stem + "_emb.safetensors"))
        return name

    def _load_unet_lora(self, source: str | dict, name: str) -> None:
        """diffusers' StableDiffusion(XL)LoraLoaderMixin.load_lora_weights, on a source already checked here."""
        loader, _ = self._unet_loader()
        options = {"use_safetensors": True} if isinstance(source, str) else {}
        loader.load_lora_weights(self, source, adapter_name=name, **options)

    def _load_dit_lora(self, state: dict, metadata: dict | None, name: str) -> None:
        """No diffusers mixin's load_lora_weights fits gen's DiT: SD's and SDXL's load into `unet`, and each
        transformer mixin is written for its model (SD3's needs text_encoder_2, Flux's and the others convert keys
        for their architectures, Amused's inherits SD's unet-only load_lora_weights). So this makes the calls
        those mixins make: the model's PeftAdapterMixin.load_lora_adapter, then load_lora_into_text_encoder.
        `_pipeline` is their way to take offload hooks off around the injection and put them back."""
        self.transformer.load_lora_adapter(
            state, prefix="transformer", adapter_name=name, metadata=metadata, _pipeline=self
        )
        for prefix, encoder in self._text_encoders().items():
            if any(k.startswith(prefix + ".") for k in state):
                self.load_lora_into_text_encoder(
                    state,
                    network_alphas=None,
                    text_encoder=encoder,
                    prefix=prefix,
                    adapter_name=name,
                    metadata=metadata,
                    _pipeline=self,
                )

    def _convert_lora(self, state: dict, label: str) -> tuple[dict, dict | None]:
        """kohya / A1111 and older diffusers key names -> diffusers' (`unet.…`, `text_encoder.…`), with kohya's
        per-module alphas, by diffusers' own lora_state_dict as its load_lora_weights calls it (UNet pipelines).
        The state given is left as it is."""
        alphas = None
        if self.denoiser_name == "transformer" and any(k.startswith(KOHYA_PREFIXES) for k in state):
            raise ValueError(
                f"{label} is a kohya / A1111 LoRA (lora_unet_… / lora_te_… keys): those are for Stable Diffusion"
                " UNets, not this pipeline's DiT"
            )
        if self.denoiser_name == "unet":
            loader, options = self._unet_loader()
            try:
                state, alphas = loader.lora_state_dict(dict(state), **options)
            except (ValueError, KeyError, RuntimeError) as e:  # kohya keys it cannot map
                detail = f"no {e}" if isinstance(e, KeyError) else " ".join(str(e).split())[:300]
                raise ValueError(f"{label}: diffusers cannot convert this kohya LoRA: {detail}") from None
        _check_lora_keys(state, label)
        return state, alphas

    def _check_components(self, state: dict, label: str) -> None:
        """Every component the LoRA adapts is in this pipeline (a text-encoder-only LoRA is one, as in diffusers)."""
        prefix = self.denoiser_name
        texts = self._text_encoders()
        found = sorted({k.split(".")[0] for k in state})
        if not set(found) & {prefix, *texts}:
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

    @_class_or_instance
    def save_lora_weights(
        self, path: str | Path | None = None, adapter_name: str = "default", **diffusers_form
    ) -> Path:
        """Write the adapter `adapter_name` of the denoiser (and of the text encoders, if they have it) to the
        file `path`, atomically, in diffusers' format. gen's own: diffusers' save_lora_weights is a classmethod
        that takes the layers and writes a folder in place -- called that way (`save_directory=`,
        `unet_lora_layers=`, `text_encoder_lora_layers=`, ...), it is diffusers' own."""
        if "save_directory" in diffusers_form or any(k.endswith("_lora_layers") for k in diffusers_form):
            directory = diffusers_form.pop("save_directory", path)
            return _diffusers_save(type(self))(directory, **diffusers_form)
        if path is None:
            raise ValueError("save_lora_weights needs the file to write (path=...)")
        from peft.utils import get_peft_model_state_dict

        state, metadata = {}, {}
        adapted = {self.denoiser_name: self.denoiser, **self._text_encoders()}
        for prefix, module in adapted.items():
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

    def fuse_lora(
        self,
        components: list[str] | None = None,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs,
    ) -> None:
        """diffusers' fuse_lora; by default into every component that can carry a LoRA (the mixin's default list
        names `unet`, not gen's DiT)."""
        super().fuse_lora(
            components=components or self._lora_loadable_modules,
            lora_scale=lora_scale,
            safe_fusing=safe_fusing,
            adapter_names=adapter_names,
            **kwargs,
        )

    def unfuse_lora(self, components: list[str] | None = None, **kwargs) -> None:
        super().unfuse_lora(components=components or self._lora_loadable_modules, **kwargs)

    def unload_lora_weights(self) -> None:
        """diffusers' unload_lora_weights, and the DreamBooth identifier tokens that came with the LoRAs."""
        super().unload_lora_weights()
        for token in getattr(self, "_lora_tokens", []):
            self.unload_textual_inversion(token)
        self._lora_tokens = []
