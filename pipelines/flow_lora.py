"""LoRA on the SD3 and Flux pipelines through diffusers' own loader mixins (SD3LoraLoaderMixin,
FluxLoraLoaderMixin): their key conversions (diffusers', kohya's and ComfyUI's layouts, Flux's BFL names) and
their adapter API (set_adapters, fuse_lora, unload_lora_weights, ...), behind gen's checks: local paths only,
safetensors only unless allow_pickle=True, the file checked whole before it is read, one line for a LoRA of
another model. The scale in joint_attention_kwargs={"scale": s} weighs the transformer's and, as diffusers does,
the CLIP (and Flux's T5) encoders' adapters.
"""

from __future__ import annotations

import inspect
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.utils import scale_lora_layers, unscale_lora_layers

from gen.pipelines.lora import _lora_source, _read_options


class _Collect(logging.Handler):
    """Keeps diffusers' "unexpected keys" warnings (gen raises them instead) and passes every other record on
    as the logger would have, at the level the caller had set."""

    def __init__(self, found: list[str], passes: int, parent: logging.Logger):
        super().__init__(logging.NOTSET)
        self.found, self.passes, self.parent = found, passes, parent

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.WARNING and "unexpected keys" in message:
            self.found.append(" ".join(message.split()))
        elif record.levelno >= self.passes:
            self.parent.handle(record)


@contextmanager
def _unexpected_keys():
    """diffusers' warnings that a LoRA's keys name layers the model lacks (it loads the rest and goes on).
    The logger is opened to warnings for the call: a quieted diffusers (`gen`'s CLI sets errors only) would
    otherwise never make the record, and the misfit LoRA would load in part."""
    found: list[str] = []
    log = logging.getLogger("diffusers.utils.peft_utils")
    level, propagate = log.level, log.propagate
    handler = _Collect(found, log.getEffectiveLevel(), log.parent or logging.getLogger())
    log.addHandler(handler)
    log.setLevel(min(log.getEffectiveLevel(), logging.WARNING))
    log.propagate = False
    try:
        yield found
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


class FlowLoraMixin:
    """load_lora_weights for a pipeline whose diffusers mixin (`_lora_loader`) is among its bases."""

    _lora_loader: type
    _lora_text_encoders: tuple[str, ...] = ("text_encoder", "text_encoder_2")

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | Path | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        allow_pickle: bool = False,
        **kwargs,
    ) -> str:
        """Load a LoRA file, folder (`weight_name=`, default pytorch_lora_weights.safetensors) or state dict as a
        named adapter, as the diffusers pipeline's load_lora_weights does; returns the adapter's name."""
        options = _read_options(kwargs)
        state, _, path, label = _lora_source(pretrained_model_name_or_path_or_dict, allow_pickle, options)
        name = adapter_name or f"adapter_{len(getattr(self.transformer, 'peft_config', None) or {})}"
        # A checked .safetensors file goes by path, so diffusers reads its LoraConfig header as from its own call.
        by_path = path is not None and path.suffix.lower() == ".safetensors"
        source = str(path) if by_path else state
        read = {"use_safetensors": True} if by_path else {}
        try:
            self._check_components(label, source, read)
            with _unexpected_keys() as unexpected:
                self._lora_loader.load_lora_weights(self, source, adapter_name=name, **read)
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise self._misfit(label, " ".join(str(e).split())) from None
        if unexpected:  # diffusers only warns, and the LoRA would be applied in part: taken off, refused
            self.delete_adapters(name)
            raise self._misfit(label, unexpected[0])
        if not self._adapter_modules(name):  # no key diffusers knows (e.g. a kohya SD3 file): it only warns
            raise self._misfit(label, "no key of it names a layer of the transformer or the text encoders")
        return name

    def _check_components(self, label: str, source, read: dict) -> None:
        """Every key of the LoRA, as diffusers' converters leave it, is for the transformer or a text encoder:
        diffusers' loader silently drops the others (a kohya-named SD3 module beside diffusers-named ones), and
        the LoRA would be applied in part. This reads the file a second time (LoRA files are small): loading
        the converted dict instead would lose the LoraConfig header diffusers reads from the file."""
        state = self._lora_loader.lora_state_dict(
            dict(source) if isinstance(source, dict) else source, **read
        )
        state = state[0] if isinstance(state, tuple) else state
        prefixes = tuple(f"{c}." for c in ("transformer", *self._lora_text_encoders))
        stray = [k for k in state if not k.startswith(prefixes)]
        if stray:
            raise ValueError(f"key {stray[0]!r} names no layer of the transformer or the text encoders")

    def _adapter_modules(self, name: str) -> list[str]:
        """The components the adapter `name` landed on."""
        components = ("transformer", *self._lora_text_encoders)
        return [c for c in components if name in (getattr(getattr(self, c, None), "peft_config", None) or {})]

    def save_lora_weights(
        self, path: str | Path | None = None, adapter_name: str = "default", **diffusers_form
    ) -> Path:
        """Write the adapter `adapter_name` of the transformer (and of the text encoders that have it) to the file
        `path`, atomically, through diffusers' own writer (its keys and LoraConfig header, so its
        load_lora_weights reads the file). Called as diffusers' classmethod (`save_directory=`,
        `transformer_lora_layers=`, ...), it is diffusers' own, as on gen's SD pipelines."""
        writer = self._lora_loader.save_lora_weights
        if "save_directory" in diffusers_form or any(k.endswith("_lora_layers") for k in diffusers_form):
            return writer(diffusers_form.pop("save_directory", path), **diffusers_form)
        if path is None:
            raise ValueError("save_lora_weights needs the file to write (path=...)")
        from peft.utils import get_peft_model_state_dict

        accepted = inspect.signature(writer).parameters
        layers: dict = {}
        for name in ("transformer", *self._lora_text_encoders):
            module = getattr(self, name, None)
            if module is None or adapter_name not in (getattr(module, "peft_config", None) or {}):
                continue
            if f"{name}_lora_layers" not in accepted:
                raise ValueError(
                    f"diffusers' {type(self).__name__} LoRA format has no place for {name}'s adapter"
                )
            layers[f"{name}_lora_layers"] = get_peft_model_state_dict(module, adapter_name=adapter_name)
            layers[f"{name}_lora_adapter_metadata"] = module.peft_config[adapter_name].to_dict()
        if not layers:
            raise ValueError(f"this pipeline has no LoRA adapter named {adapter_name!r} to save")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # same filesystem: the rename is atomic
            writer(tmp, weight_name=path.name, **layers)
            os.replace(Path(tmp) / path.name, path)
        return path

    def _misfit(self, label: str, detail: str) -> ValueError:
        return ValueError(
            f"{label} does not fit this {type(self.transformer).__name__} (another model's LoRA?): {detail[:300]}"
        )

    @contextmanager
    def _text_lora_scale(self):
        """The text encoders' adapters weighed by joint_attention_kwargs' "scale" while the prompts encode."""
        scale = (self.joint_attention_kwargs or {}).get("scale")
        encoders = [getattr(self, n, None) for n in self._lora_text_encoders]
        encoders = [e for e in encoders if e is not None and getattr(e, "peft_config", None)]
        for encoder in encoders if scale is not None else []:
            scale_lora_layers(encoder, scale)
        try:
            yield
        finally:
            for encoder in encoders if scale is not None else []:
                unscale_lora_layers(encoder, scale)
