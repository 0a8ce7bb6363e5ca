"""Pure math on tensors, no model code: guidance, training targets and loss weights, and the sampler names.

Importing the package loads no torch (the CLI lists samplers without it); `guidance` loads on first use."""

from __future__ import annotations

__all__ = ["guidance"]


def __getattr__(name: str):
    if name == "guidance":
        from gen.diffusion.guidance import guidance

        return guidance
    raise AttributeError(f"module 'gen.diffusion' has no attribute {name!r}")
