"""The OpenVINO backend: a loaded pipeline's denoiser (UNet or DiT) and VAE (decoder, and encoder for image-to-image)
run as OpenVINO compiled models, the pipeline staying gen's (same call arguments, schedulers swappable).

Why our own and not optimum-intel or `torch.compile(backend="openvino")`: optimum's OVStableDiffusionPipeline is
another pipeline class (diffusers' call, not gen's: no A1111 prompt weights, chunks, guidance interval), and the
torch.compile backend fails with this torch (issue 27). So each module is converted with
`openvino.convert_model(module, example_input=...)` once, with dynamic batch, size and text length, saved under the
cache folder keyed by the weights' hash, the component and the versions (a second process reads it in a moment
instead of converting again), then compiled once per input shape it meets (static shapes are what make OpenVINO
fast; a new size or batch costs one compile, ~1-4 s at SD scale, and OpenVINO's own CACHE_DIR keeps those blobs
too). The torch modules stay in place for their configs, and run what OpenVINO is not given: ControlNet
residuals, LoRA (refused before conversion: see check_openvino_lora), the text encoders (a small part of the time).

Precision: "bf16" asks OpenVINO's INFERENCE_PRECISION_HINT for bf16 (where the CPU has it natively: "auto" picks it
there, gen.loading.precision.native_bf16), "fp32" for f32.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from gen.files import atomic_write
from gen.loading.precision import HINTS

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gen" / "openvino"


def use_openvino(pipe, weights_hash: str, dtype: str = "fp32", cache: Path | None = None) -> dict:
    """Run `pipe`'s denoiser and VAE with OpenVINO (in place). Returns what was done: {component: "converted" |
    "cached"} and the precision hint, for the caller to report."""
    import openvino as ov

    cache = cache or cache_root()
    core = ov.Core()
    core.set_property("CPU", {"CACHE_DIR": str(cache / "blobs")})
    hint = HINTS[dtype]
    done = {"precision": hint}
    denoiser = pipe.denoiser
    xl = getattr(denoiser.config, "addition_embed_type", None) == "text_time"
    # A DiT picks its position embedding by the latent size while traced (gen.models.dit), so its graphs are
    # converted per size (batch and text length stay dynamic); the UNet's and VAE's convolutions take any size.
    per_size = pipe.denoiser_name == "transformer"
    parts = {
        pipe.denoiser_name: (_DenoiserCore(denoiser, xl), _denoiser_example(pipe, xl), per_size),
        "vae_decoder": (_VaeCall(pipe.vae, "decode"), _vae_example(pipe, decoder=True), False),
        "vae_encoder": (_VaeCall(pipe.vae, "encode"), _vae_example(pipe, decoder=False), False),
    }
    compiled = {}
    for name, (module, example, sized) in parts.items():
        folder = cache / _key(weights_hash, name, module)
        compiled[name] = Compiled(core, hint, Converter(module, folder, name, sized))
        done[name] = compiled[name].converter.ready(example)  # the default size now: its first call is quick
    _patch_denoiser(denoiser, compiled[pipe.denoiser_name], xl)
    _patch_vae(pipe.vae, compiled["vae_decoder"], compiled["vae_encoder"])
    pipe._openvino = done
    return done


def _key(weights_hash: str, name: str, module: torch.nn.Module) -> str:
    """The converted model's folder: the weights, the component's config, and the versions that convert it."""
    import openvino as ov

    config = getattr(module, "config_json", "")
    text = json.dumps([weights_hash, name, config, ov.__version__, torch.__version__], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class Converter:
    """A module's converted OpenVINO model on disk: one with dynamic shapes, or with `sized` one per spatial size
    (dims 2 and 3 of the first input static, batch and the rest dynamic)."""

    def __init__(self, module: torch.nn.Module, folder: Path, name: str, sized: bool):
        self.module, self.folder, self.name, self.sized = module, folder, name, sized

    def path(self, shapes: list[tuple]) -> Path:
        size = f"-{shapes[0][2]}x{shapes[0][3]}" if self.sized else ""
        return self.folder / f"{self.name}{size}.xml"

    def ready(self, example: tuple) -> str:
        """The model for these example inputs on disk: "cached" if it was, "converted" if made now."""
        path = self.path([tuple(x.shape) for x in example])
        if path.is_file():
            return "cached"
        self._convert(example, path)
        return "converted"

    def _convert(self, example: tuple, path: Path) -> None:
        import openvino as ov

        logger.info("converting %s to OpenVINO (once; kept in %s)", path.stem, path.parent)
        # dynamic batch, size and text length; channels and widths are the model's
        shapes = [[-1] * x.dim() for x in example]
        for shape, x in zip(shapes, example, strict=True):
            if x.dim() == 4:
                shape[1] = x.shape[1]
            elif x.dim() >= 2:
                shape[-1] = x.shape[-1]
        if self.sized:
            shapes[0][2:] = list(example[0].shape[2:])
        with torch.no_grad():
            model = ov.convert_model(
                self.module.eval(), example_input=example, input=[ov.PartialShape(s) for s in shapes]
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        # written under a temporary name, then renamed: a half-written model is never read back
        with atomic_write(path) as tmp_xml:
            tmp = tmp_xml.with_name(tmp_xml.name + ".xml")
            ov.save_model(model, str(tmp), compress_to_fp16=False)
            os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))
            os.replace(tmp, tmp_xml)


class Compiled:
    """A converted model compiled once per input shape (converted first where it is per size)."""

    def __init__(self, core, hint: str, converter: Converter):
        self.core, self.hint, self.converter = core, hint, converter
        self._by_shape: dict = {}

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        key = tuple(a.shape for a in arrays)
        if key not in self._by_shape:
            import openvino as ov

            self.converter.ready(tuple(torch.from_numpy(a) for a in arrays))
            model = self.core.read_model(str(self.converter.path(list(key))))
            model.reshape({model.input(i): ov.PartialShape(list(a.shape)) for i, a in enumerate(arrays)})
            self._by_shape[key] = self.core.compile_model(
                model, "CPU", {"INFERENCE_PRECISION_HINT": self.hint}
            )
        compiled = self._by_shape[key]
        return compiled(list(arrays))[compiled.output(0)]


class _DenoiserCore(torch.nn.Module):
    """The denoiser as OpenVINO takes it: tensors in (timesteps one per row), the prediction out."""

    def __init__(self, denoiser, xl: bool):
        super().__init__()
        self.denoiser, self.xl = denoiser, xl
        self.forward_torch = denoiser.forward
        self.config_json = json.dumps(dict(denoiser.config), sort_keys=True, default=str)

    def forward(self, sample, timestep, context, text_embeds=None, time_ids=None):
        kw = {"added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": time_ids}} if self.xl else {}
        return self.forward_torch(sample, timestep, encoder_hidden_states=context, return_dict=False, **kw)[0]


class _VaeCall(torch.nn.Module):
    """The VAE's decoder (latents -> pixels) or encoder (pixels -> posterior moments), as diffusers' _decode and
    _encode compute them."""

    def __init__(self, vae, part: str):
        super().__init__()
        self.vae, self.part = vae, part  # a submodule: traced with its weights as parameters, not constants
        self.run = vae._decode if part == "decode" else vae._encode  # bound before _patch_vae replaces them
        self.config_json = json.dumps([part, dict(vae.config)], sort_keys=True, default=str)

    def forward(self, x):
        return self.run(x).sample if self.part == "decode" else self.run(x)


def _denoiser_example(pipe, xl: bool) -> tuple:
    """Inputs to trace with: batch 2 (CFG), the model's default size, 77 text tokens (the dims are dynamic)."""
    config = pipe.denoiser.config
    size = pipe.default_size // pipe.vae_scale_factor
    example = [
        torch.randn(2, config.in_channels, size, size),
        torch.full((2,), 500.0),
        torch.randn(2, 77, config.cross_attention_dim),
    ]
    if xl:
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        example += [torch.randn(2, pooled), torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2)]
    return tuple(example)


def _vae_example(pipe, decoder: bool) -> tuple:
    latent = pipe.vae.config.latent_channels
    size = pipe.default_size
    if decoder:
        return (torch.randn(1, latent, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor),)
    return (torch.randn(1, 3, size, size),)


def _numpy(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().to(torch.float32).cpu().numpy())


def _patch_denoiser(denoiser, compiled: Compiled, xl: bool) -> None:
    """The module's forward through OpenVINO, except for what only torch runs (ControlNet residuals, extra
    arguments): those calls go to its own forward."""
    torch_forward = denoiser.forward

    def forward(sample, timestep, encoder_hidden_states=None, *args, return_dict=True, **kw):
        added = kw.pop("added_cond_kwargs", None)
        kw.pop("cross_attention_kwargs", None)  # LoRA scales: refused with this backend (check_openvino_lora)
        if args or any(v is not None for v in kw.values()):
            return torch_forward(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict,
                                 added_cond_kwargs=added, **kw)  # fmt: skip
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(sample.shape[0])
        inputs = [sample, t, encoder_hidden_states]
        if xl:
            inputs += [added["text_embeds"], added["time_ids"]]
        out = torch.from_numpy(compiled(*(_numpy(x) for x in inputs))).to(sample.dtype)
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=out)
        return (out,)

    denoiser.forward = forward


def _patch_vae(vae, decoder: Compiled, encoder: Compiled) -> None:
    from diffusers.models.autoencoders.vae import DecoderOutput

    def decode(z, return_dict=True):
        out = DecoderOutput(sample=torch.from_numpy(decoder(_numpy(z))).to(z.dtype))
        return out if return_dict else (out.sample,)

    def encode(x):
        return torch.from_numpy(encoder(_numpy(x))).to(x.dtype)

    vae._decode, vae._encode = decode, encode
