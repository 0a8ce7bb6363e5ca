"""A1111's Clip skip in gen's pipelines: the one rule the CLI, the server and `gen reproduce` share.

A1111 counts from the end: "Clip skip: 1" reads the text encoder's last layer, 2 the penultimate, and so on; gen's
pipelines count layers skipped, as diffusers does (their clip_skip=1 is A1111's 2). Which encoders A1111 applies it
to (its modules/sd_hijack_clip.py and sd_hijack_open_clip.py) is followed too, so an A1111 picture's "Clip skip"
means here what it meant there:
- an OpenAI CLIP encoder (SD 1.x, gen's own models): hidden state N from the end, then the final layer norm;
- an OpenCLIP encoder (SD 2.x, told by its "gelu" activation; OpenAI's CLIP uses "quick_gelu"): not applied,
  A1111 reads SD 2's penultimate layer whatever Clip skip says;
- SDXL: not applied (both encoders read their penultimate layers) unless A1111's `sdxl_clip_l_skip` setting is
  on; then the first encoder (CLIP-L) reads hidden state N from the end with no final norm — so N = 1 is its last
  layer and N = 2 the default — and the second encoder keeps its penultimate.
Python callers who want diffusers' reading instead (both SDXL encoders, SD 2 too) pass the pipeline's clip_skip.
"""

from __future__ import annotations

from gen.text.encode import ClipSkip


def pipeline_clip_skip(pipe, clip_skip: int | None, sdxl_clip_l_skip: bool = False) -> ClipSkip:
    """A1111's Clip skip N (None: the model's default) as gen's pipeline `clip_skip` for this model."""
    if clip_skip is None or not applies(pipe, sdxl_clip_l_skip):
        return None
    layers = pipe.text_encoder.config.num_hidden_layers
    if not 1 <= clip_skip <= layers:
        raise ValueError(
            f"clip-skip {clip_skip} must be between 1 and {layers}: the text encoder has {layers} layers"
            " (A1111's numbering: 1 is the last layer, 2 the penultimate)"
        )
    if pipe.is_sdxl:
        return (clip_skip - 2, None)
    return clip_skip - 1 if clip_skip > 1 else None


def applies(pipe, sdxl_clip_l_skip: bool = False) -> bool:
    """Does A1111 apply Clip skip to this model's text encoder (see the module's docstring)?"""
    if pipe.is_sdxl:
        return sdxl_clip_l_skip
    return getattr(pipe.text_encoder.config, "hidden_act", "quick_gelu") != "gelu"


def not_applied(pipe, clip_skip: int | None, sdxl_clip_l_skip: bool = False) -> str | None:
    """Why a Clip skip that would change the picture is not applied to this model, as in A1111; None otherwise."""
    if clip_skip is None or applies(pipe, sdxl_clip_l_skip):
        return None
    if pipe.is_sdxl and clip_skip > 2:  # 1 and 2 are both encoders' penultimate layers, the default
        return (
            f"clip skip {clip_skip} is not applied to SDXL, as in A1111: --sdxl-clip-l-skip (A1111's 'Clip skip"
            " SDXL' setting) applies it to the first text encoder"
        )
    if not pipe.is_sdxl and clip_skip > 1:
        return f"clip skip {clip_skip} is not applied to SD 2.x's OpenCLIP text encoder, as in A1111"
    return None
