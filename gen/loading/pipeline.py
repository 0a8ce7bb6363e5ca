"""Loading and saving weights; the embedded default model."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from gen.generation.options import check_precision

logger = logging.getLogger(__name__)

# The embedded default model ships inside the package (see gen.train.shapes for how it is made).
DEFAULT_MODEL = Path(__file__).parents[1] / "assets" / "shapes"  # gen/assets/shapes


def load_pipeline(
    path: str | Path | None = None,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
):
    """Load a local pipeline folder (gen's, SD 1.x/2.x or SDXL: one class takes both, SDXL when model_index.json
    names text_encoder_2) or single .safetensors SD checkpoint; with no path, the embedded default model.
    Never reaches the network; refuses pickle weights unless allow_pickle (see gen.loading.safety)."""
    from gen.pipelines import TextToImagePipeline

    check_precision({torch.float16: "fp16", torch.bfloat16: "bf16"}.get(torch_dtype, "fp32"), str(device))
    folder = Path(path) if path is not None else DEFAULT_MODEL
    if folder.is_file():  # one original-layout checkpoint (SD 1.x/2.x), configs shipped with gen
        from gen.loading.single_file import load_single_file

        pipe = load_single_file(folder, torch_dtype=torch_dtype, allow_pickle=allow_pickle)
    else:
        pipe = TextToImagePipeline.from_pretrained(folder, allow_pickle=allow_pickle, dtype=torch_dtype)
        check_tokenizer(pipe.tokenizer, pipe.text_encoder, folder)
        if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL
            check_tokenizer(pipe.tokenizer_2, pipe.text_encoder_2, folder, "tokenizer_2")
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if torch_dtype in (torch.float16, torch.bfloat16):
        pipe.vae.to(
            torch.float32
        )  # half-precision VAEs overflow or band; the decoder is a small part of the time
    return pipe


def check_tokenizer(tokenizer, text_encoder, folder: Path, name: str = "tokenizer") -> None:
    """A tokenizer folder missing its vocabulary loads without error as a 2-token tokenizer; catch that here."""
    expected = text_encoder.config.vocab_size
    if len(tokenizer) < expected // 2:
        raise ValueError(
            f"{folder / name}: the tokenizer has {len(tokenizer)} tokens but the text encoder expects"
            f" {expected}; are vocab.json and merges.txt (or tokenizer.json) missing?"
        )
