"""A1111's Clip skip in gen's pipelines: the one rule the CLI, the server and `gen reproduce` share.

A1111 counts from the end: "Clip skip: 1" (its default) reads the text encoder's last layer, 2 the penultimate, and
so on; gen's pipelines count layers skipped from the layer they read by default, as diffusers does. Which encoders
A1111 applies it to (its modules/sd_hijack_clip.py and sd_hijack_open_clip.py) is followed too, so an A1111
picture's "Clip skip" means here what it meant there:
- an OpenAI CLIP encoder (SD 1.x, gen's own models): hidden state N from the end, then the final layer norm
  (the pipelines' clip_skip = N - 1);
- an OpenCLIP encoder (SD 2.x, told by its "gelu" activation; OpenAI's CLIP uses "quick_gelu"): not applied,
  A1111 reads SD 2's penultimate layer whatever Clip skip says;
- SDXL: not applied (both encoders read their penultimate layers) unless A1111's `sdxl_clip_l_skip` setting is
  on; then the first encoder (CLIP-L) reads hidden state N from the end with no final norm — so N = 1, the
  default, is its last layer and N = 2 SDXL's usual reading — and the second encoder keeps its penultimate (the
  pipelines' clip_skip = (N - 2, None)).
Python callers who want diffusers' reading instead (both SDXL encoders, SD 2 too) pass the pipeline's clip_skip.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gen.text.encode import ClipSkip

DEFAULT = 1  # A1111's CLIP_stop_at_last_layers when nobody set it: the last layer


def pipeline_clip_skip(pipe, clip_skip: int | None, sdxl_clip_l_skip: bool = False) -> ClipSkip:
    """A1111's Clip skip N (None: its default, 1) as gen's pipeline `clip_skip` for this model."""
    n = DEFAULT if clip_skip is None else clip_skip
    if not applies(pipe, sdxl_clip_l_skip):
        return None
    layers = pipe.text_encoder.config.num_hidden_layers
    if not 1 <= n <= layers:
        which = "SDXL's first text encoder (CLIP-L)" if pipe.is_sdxl else "the text encoder"
        raise ValueError(
            f"clip skip {n} must be between 1 and {layers}: {which} has {layers} layers (A1111's numbering: 1 is"
            " the last layer, 2 the penultimate)"
        )
    if pipe.is_sdxl:
        return (n - 2, None)
    return n - 1 if n > 1 else None


def applies(pipe, sdxl_clip_l_skip: bool = False) -> bool:
    """Does A1111 apply Clip skip to this model's text encoder (see the module's docstring)? Not to SD3 or Flux
    here: their CLIP encoders are read as diffusers reads them."""
    if getattr(pipe, "is_flow", False):
        return False
    if pipe.is_sdxl:
        return sdxl_clip_l_skip
    return getattr(pipe.text_encoder.config, "hidden_act", "quick_gelu") != "gelu"


def not_applied(pipe, clip_skip: int | None, sdxl_clip_l_skip: bool = False) -> str | None:
    """Why a Clip skip that would change the picture is not applied to this model, as in A1111; None otherwise."""
    if clip_skip is None or applies(pipe, sdxl_clip_l_skip):
        return None
    if pipe.is_sdxl and clip_skip > 2:  # 1 (the default) and 2 ask for what SDXL reads anyway
        return (
            f"clip skip {clip_skip} is not applied to SDXL, as in A1111: --sdxl-clip-l-skip (A1111's 'Clip skip"
            " SDXL' setting) applies it to the first text encoder"
        )
    if getattr(pipe, "is_flow", False) and clip_skip > 1:
        return f"clip skip {clip_skip} is not applied to SD3/Flux models here"
    if not pipe.is_sdxl and clip_skip > 1:
        return f"clip skip {clip_skip} is not applied to SD 2.x's OpenCLIP text encoder, as in A1111"
    return None


def check_recorded(pipe, clip_skip: int | None, read_from_format: int) -> None:
    """A record of metadata format 1 held the pipelines' clip_skip (read as A1111's N = k + 1), which gen then
    applied to SD 2.x's and SDXL's encoders too; A1111's rule does not, so such a picture cannot be made again
    from its record: refused rather than made differently."""
    if read_from_format >= 2 or clip_skip is None or clip_skip <= 1 or applies(pipe):
        return
    raise ValueError(
        f"made by an earlier gen with the pipelines' clip_skip={clip_skip - 1}, applied to this model's text"
        " encoders; gen now follows A1111, which applies no Clip skip on SD 2.x or SDXL (without"
        f" --sdxl-clip-l-skip); from Python, the pipeline's clip_skip={clip_skip - 1} makes it again"
    )
