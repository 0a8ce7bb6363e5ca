"""The OpenVINO backend: a loaded pipeline's denoiser (UNet or DiT) and VAE (decoder, and encoder for image-to-image)
run as OpenVINO compiled models, the pipeline staying gen's (same call arguments, schedulers swappable).

Why our own and not optimum-intel or `torch.compile(backend="openvino")`: optimum's OVStableDiffusionPipeline is
another pipeline class (diffusers' call, not gen's: no A1111 prompt weights, chunks, guidance interval), and the
torch.compile backend fails with this torch (issue 27). So each module is converted with
`openvino.convert_model(module, example_input=...)` once, with dynamic batch, size and text length, saved under the
cache folder keyed by the weights' hash, the component and the versions (a second process reads it in a moment
instead of converting again), then compiled once per input shape it meets (static shapes are what make OpenVINO
fast; a new size or batch costs one compile, ~1-4 s at SD scale, and OpenVINO's own CACHE_DIR keeps those blobs
too). The CLIP text encoders are converted too (ids in; the first output, the pooled or
projected one, and every hidden state out, so clip skip and SDXL's penultimate reading work unchanged). The torch
modules stay in place for their configs, and run what OpenVINO is not given: ControlNet residuals, attention masks,
a text encoder whose vocabulary grew after conversion (textual inversion: logged, then torch), LoRA (refused
before conversion: gen.generation.options).

Precision: "bf16" asks OpenVINO's INFERENCE_PRECISION_HINT for bf16 (where the CPU has it natively: "auto" picks it
there, gen.loading.precision.native_bf16), "fp32" for f32.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from gen.files import atomic_write
from gen.loading.precision import HINTS

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gen" / "openvino"


def use_openvino(
    pipe,
    weights_hash: str,
    dtype: str = "fp32",
    cache: Path | None = None,
    reload: Callable[[], object] | None = None,
) -> dict:
    """Run `pipe`'s denoiser, VAE and CLIP text encoders with OpenVINO (in place). Returns what was done:
    {component: "converted" | "cached"} and the precision hint, for the caller to report. With `reload` (a
    function that loads the same pipeline again in torch), the torch copies of the converted weights are released
    (OpenVINO holds its own) and reloaded from it the first time a call needs torch (see TorchWeights)."""
    import openvino as ov

    cache = cache or cache_root()
    hint = HINTS[dtype]
    core = ov.Core()
    # One blob folder per precision: openvino 2026.4.1's compiled-blob cache does not key on the precision hint,
    # so a bf16 compile read the f32 blob of the same model and ran it as bf16 -- NaN (measured on an Intel Xeon
    # with AMX: f32 then bf16 in one cache folder left one blob, and the bf16 UNet gave NaN; in its own folder,
    # finite, max |diff| 0.03 to torch fp32 on outputs of ~1.4)
    core.set_property("CPU", {"CACHE_DIR": str(cache / "blobs" / hint)})
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
    weights = TorchWeights(pipe, reload)
    compiled = {}
    for name, (module, example, sized) in parts.items():
        folder = cache / _key(weights_hash, name, module)
        compiled[name] = Compiled(core, hint, Converter(module, folder, name, sized))
        done[name] = compiled[name].converter.ready(example)  # the default size now: its first call is quick
    encoders = _text_encoders(pipe)
    for name in encoders:
        encoder = getattr(pipe, name)
        core_module = _TextCore(encoder)
        folder = cache / _key(weights_hash, name, core_module)
        compiled[name] = Compiled(core, hint, Converter(core_module, folder, name, False))
        done[name] = compiled[name].converter.ready(_text_example(encoder))
        _patch_text_encoder(encoder, compiled[name], core_module, weights)
    _patch_denoiser(denoiser, compiled[pipe.denoiser_name], xl, weights)
    _patch_vae(pipe.vae, compiled["vae_decoder"], compiled["vae_encoder"])
    # a DiT keeps its torch weights: its graph is converted for each new latent size, from them
    weights.release([*([] if per_size else [pipe.denoiser_name]), "vae", *encoders])
    pipe._openvino, pipe._torch_weights = done, weights
    return done


class TorchWeights:
    """The torch copies of what OpenVINO runs: released after conversion (at SD scale 4 GB in fp32, which would
    otherwise sit beside OpenVINO's own copy), and put back by loading the pipeline again the first time a call
    takes a torch path (ControlNet residuals, an attention mask, a vocabulary grown by textual inversion): that
    call pays one load, logged. The modules keep their configs, dtypes and devices (a released parameter is an
    empty tensor on the same device); a CLIP encoder keeps its final layer norm (clip skip applies it in torch), and
    gen's DiT all of its weights (converted once per latent size, from them)."""

    def __init__(self, pipe, reload: Callable[[], object] | None):
        self.pipe, self.reload, self.released = pipe, reload, []

    def release(self, names: list[str]) -> None:
        if self.reload is None:
            return
        for name in names:
            for tensor in self._tensors(getattr(self.pipe, name)).values():
                tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        self.released = names

    def restore(self) -> None:
        """Load the torch weights back (once), for a call OpenVINO does not run."""
        if not self.released:
            return
        logger.info("loading the torch weights OpenVINO replaced, for a call that needs torch (once)")
        fresh = self.reload()
        for name in self.released:
            source = self._tensors(getattr(fresh, name))
            for key, tensor in self._tensors(getattr(self.pipe, name)).items():
                tensor.data = source[key].data
        self.released = []

    @staticmethod
    def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        named = dict(module.named_parameters()) | dict(module.named_buffers())
        return {k: t for k, t in named.items() if "final_layer_norm" not in k}


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
        return self.outputs(*arrays)[0]

    def outputs(self, *arrays: np.ndarray) -> list[np.ndarray]:
        """Every output of the model, in order."""
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
        result = compiled(list(arrays))
        return [result[out] for out in compiled.outputs]


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


class _TextCore(torch.nn.Module):
    """A CLIP text encoder as OpenVINO takes it: ids in; out its output's first two fields (CLIPTextModel: the last
    hidden state and the pooled one; CLIPTextModelWithProjection: text_embeds and the last hidden state) and every
    hidden state stacked (layers, B, L, D), which _patch_text_encoder unstacks into the output transformers gives."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.forward_torch = encoder.forward
        self.config_json = json.dumps(encoder.config.to_dict(), sort_keys=True, default=str)

    def forward(self, ids):
        out = self.forward_torch(ids, output_hidden_states=True, return_dict=True)
        first, second = out.to_tuple()[:2]
        return first, second, torch.stack(out.hidden_states)


def _text_encoders(pipe) -> list[str]:
    """The pipeline's CLIP text encoders (SD: one; SDXL: two)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    clip = (CLIPTextModel, CLIPTextModelWithProjection)
    return [n for n in ("text_encoder", "text_encoder_2") if isinstance(getattr(pipe, n, None), clip)]


def _text_example(encoder) -> tuple:
    """Ids to trace with: batch 2, the encoder's window (the batch is dynamic; chunks are always this long)."""
    length = encoder.config.max_position_embeddings
    return (torch.randint(0, encoder.config.vocab_size, (2, length)),)


def _patch_text_encoder(encoder, compiled: Compiled, core: _TextCore, weights: TorchWeights) -> None:
    """The encoder's forward through OpenVINO, as transformers' output class (fields as torch gives them); calls
    OpenVINO was not given (a mask, positions, a vocabulary grown after conversion) go to its own forward."""
    from transformers import CLIPTextModelWithProjection
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from transformers.models.clip.modeling_clip import CLIPTextModelOutput

    torch_forward = core.forward_torch
    if isinstance(encoder, CLIPTextModelWithProjection):
        kind, names = CLIPTextModelOutput, ("text_embeds", "last_hidden_state")
    else:
        kind, names = BaseModelOutputWithPooling, ("last_hidden_state", "pooler_output")
    vocab = encoder.get_input_embeddings().num_embeddings

    def forward(input_ids=None, attention_mask=None, position_ids=None, output_hidden_states=None, **kw):
        grown = encoder.get_input_embeddings().num_embeddings != vocab
        if grown or attention_mask is not None or position_ids is not None or input_ids is None:
            if grown:
                logger.info("the text encoder's vocabulary grew after conversion: it runs in torch")
            weights.restore()
            return torch_forward(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 output_hidden_states=output_hidden_states, **kw)  # fmt: skip
        first, second, stacked = (torch.from_numpy(a) for a in compiled.outputs(_numpy(input_ids)))
        hidden = tuple(stacked.unbind(0)) if output_hidden_states else None
        out = kind(**{names[0]: first, names[1]: second}, hidden_states=hidden)
        return out if kw.get("return_dict", True) is not False else out.to_tuple()

    encoder.forward = forward


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
    if not x.is_floating_point():  # token ids stay integers
        return np.ascontiguousarray(x.detach().cpu().numpy())
    return np.ascontiguousarray(x.detach().to(torch.float32).cpu().numpy())


def _patch_denoiser(denoiser, compiled: Compiled, xl: bool, weights: TorchWeights) -> None:
    """The module's forward through OpenVINO, except for what only torch runs (ControlNet residuals, extra
    arguments): those calls go to its own forward."""
    torch_forward = denoiser.forward

    def forward(sample, timestep, encoder_hidden_states=None, *args, return_dict=True, **kw):
        added = kw.pop("added_cond_kwargs", None)
        kw.pop("cross_attention_kwargs", None)  # LoRA scales: refused with this backend (check_openvino_lora)
        if args or any(v is not None for v in kw.values()):
            weights.restore()
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
