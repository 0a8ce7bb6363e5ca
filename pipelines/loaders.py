"""diffusers' loaders behind gen's checks (gen.pipelines.safety): local files only, safetensors unless allowed,
gen's shipped configs for original-layout single files (gen.pipelines.single_file), embeddings without pickle."""

from __future__ import annotations

from pathlib import Path

import torch

from gen.pipelines.safety import PICKLE, check_finite, check_folder
from gen.pipelines.single_file import load_original


class SafeLoadersMixin:
    """from_pretrained, from_single_file and load_textual_inversion for gen's pipelines. First among a pipeline's
    bases, before DiffusionPipeline, so that `super()` here is diffusers' loader."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, allow_pickle: bool = False, **kwargs):
        """diffusers' loader behind gen's checks (gen.pipelines.safety): a local folder only, safetensors unless
        allow_pickle, classes from diffusers/transformers/gen only, whole files, finite weights."""
        folder = Path(pretrained_model_name_or_path)
        check_folder(folder, allow_pickle)
        kwargs.setdefault("local_files_only", True)
        kwargs.setdefault(
            "use_safetensors", None if allow_pickle else True
        )  # None: safetensors first, then pickle
        try:
            pipe = super().from_pretrained(str(folder), **kwargs)
        except (
            ValueError,
            RuntimeError,
            OSError,
        ) as e:  # a library's multi-line message, made one clear line
            detail = str(e).split(". If you want")[0].replace("Cannot load because ", "")
            raise ValueError(f"{folder}: could not load it: {' '.join(detail.split())}") from None
        check_finite(pipe, folder)
        return pipe

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path, **kwargs):
        """diffusers' single-file loader, offline: without `config=`, gen's shipped SD 1.x/2.x configs are used."""
        if "config" not in kwargs:
            return load_original(
                cls, pretrained_model_link_or_path, torch_dtype=kwargs.get("torch_dtype", torch.float32)
            )
        kwargs.setdefault("local_files_only", True)
        return super().from_single_file(pretrained_model_link_or_path, **kwargs)

    def load_textual_inversion(
        self, pretrained_model_name_or_path, token=None, allow_pickle: bool = False, **kwargs
    ):
        """diffusers' loader (A1111 and diffusers embedding formats), refusing pickle files unless allow_pickle:
        a .pt/.bin/.ckpt file can run code when unpickled. With allow_pickle, diffusers reads it with
        torch.load(weights_only=True)."""
        sources = pretrained_model_name_or_path
        for source in sources if isinstance(sources, list) else [sources]:
            suffix = Path(str(source)).suffix.lower() if isinstance(source, (str, Path)) else ""
            if suffix in PICKLE and not allow_pickle:
                raise ValueError(
                    f"{source}: {suffix} embeddings are pickle files, which can run code when loaded; use a"
                    " .safetensors file or pass allow_pickle=True"
                )
        kwargs.setdefault("local_files_only", True)
        released = getattr(self, "_torch_weights", None)  # the OpenVINO backend's (gen.loading.backend)
        if released is not None:
            released.restore()  # the table grows from its torch copy
        return super().load_textual_inversion(pretrained_model_name_or_path, token=token, **kwargs)
