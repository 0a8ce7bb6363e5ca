"""The pipeline-wide attention switch: SDPA (default), plain matmuls, or xformers where it can run."""

from __future__ import annotations

import logging

from gen.generation.options import ATTENTION

logger = logging.getLogger(__name__)


def set_attention(pipe, backend: str) -> str:
    """Select the denoiser's attention: "sdpa" (default), "math" (plain matmuls), or "xformers" where it is
    installed and the model is on CUDA; otherwise warn and keep SDPA. Returns the backend in use."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if backend not in ATTENTION:
        raise ValueError(f"attention {backend!r} must be one of {list(ATTENTION)}")
    if backend == "xformers":
        import importlib.util

        if importlib.util.find_spec("xformers") is None or pipe.denoiser.device.type != "cuda":
            logger.warning("xformers needs the xformers package and a CUDA device; using SDPA instead")
            backend = "sdpa"
        else:
            pipe.enable_xformers_memory_efficient_attention()
            return backend
    pipe.denoiser.set_attn_processor(AttnProcessor2_0() if backend == "sdpa" else AttnProcessor())
    return backend
