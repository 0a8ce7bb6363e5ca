"""The pipeline-wide attention backend switch: which kernel the denoiser's attention runs on (SDPA by default,
plain matmuls, or xformers where it can run). Not attention itself: the denoisers' processors do that."""

from __future__ import annotations

import importlib.util
import logging

logger = logging.getLogger(__name__)

ATTENTION = ("sdpa", "math", "xformers")  # SDPA (default), plain matmuls, xformers where it can run


def set_attention(pipe, backend: str) -> str:
    """Select the denoiser's attention: "sdpa" (default), "math" (plain matmuls), or "xformers" where it is
    installed and the model is on CUDA; otherwise warn and keep SDPA. Returns the backend in use."""
    # diffusers on first use only: ATTENTION stays readable without it, as the option checks before any load need.
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if backend not in ATTENTION:
        raise ValueError(f"attention {backend!r} must be one of {list(ATTENTION)}")
    if getattr(pipe, "is_flow", False):
        # SD3's and Flux's joint attention has its own processors, on SDPA: swapping in UNet-style ones breaks it.
        if backend != "sdpa":
            raise ValueError(f"attention {backend!r} is not available for SD3/Flux models here; use 'sdpa'")
        return backend
    if backend == "xformers":
        if importlib.util.find_spec("xformers") is None or pipe.denoiser.device.type != "cuda":
            logger.warning("xformers needs the xformers package and a CUDA device; using SDPA instead")
            backend = "sdpa"
        else:
            pipe.enable_xformers_memory_efficient_attention()
            return backend
    pipe.denoiser.set_attn_processor(AttnProcessor2_0() if backend == "sdpa" else AttnProcessor())
    return backend
