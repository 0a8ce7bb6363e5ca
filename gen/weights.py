"""Loading and saving weights; the embedded default model."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# The embedded default model ships inside the package (see gen.train.shapes for how it is made).
DEFAULT_MODEL = Path(__file__).parent / "assets" / "shapes"


def load_pipeline(
    path: str | Path | None = None,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
):
    """Load a local pipeline folder or single .safetensors SD checkpoint; with no path, the embedded default model.
    Never reaches the network; refuses pickle weights unless allow_pickle (see gen.safety)."""
    from gen.pipelines import TextToImagePipeline

    if torch_dtype == torch.float16 and torch.device(device).type == "cpu":
        raise ValueError(
            "torch.float16 is ~10x slower than float32 on a CPU; use torch.bfloat16 or float32 there"
        )
    folder = Path(path) if path is not None else DEFAULT_MODEL
    if folder.is_file():  # one original-layout checkpoint (SD 1.x/2.x), configs shipped with gen
        from gen.single_file import load_single_file

        pipe = load_single_file(folder, torch_dtype=torch_dtype, allow_pickle=allow_pickle)
    else:
        pipe = TextToImagePipeline.from_pretrained(folder, allow_pickle=allow_pickle, dtype=torch_dtype)
        check_tokenizer(pipe.tokenizer, pipe.text_encoder, folder)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if torch_dtype in (torch.float16, torch.bfloat16):
        pipe.vae.to(
            torch.float32
        )  # half-precision VAEs overflow or band; the decoder is a small part of the time
    return pipe


def check_tokenizer(tokenizer, text_encoder, folder: Path) -> None:
    """A tokenizer folder missing its vocabulary loads without error as a 2-token tokenizer; catch that here."""
    expected = text_encoder.config.vocab_size
    if len(tokenizer) < expected // 2:
        raise ValueError(
            f"{folder / 'tokenizer'}: the tokenizer has {len(tokenizer)} tokens but the text encoder expects"
            f" {expected}; are vocab.json and merges.txt (or tokenizer.json) missing?"
        )
